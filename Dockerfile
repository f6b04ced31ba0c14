# One image for every Argus service; compose picks the role with `command:`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-tools curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY constraints.txt requirements.txt ./
RUN pip install --no-cache-dir -c constraints.txt -r requirements.txt

COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
COPY loadgen ./loadgen
COPY world ./world
COPY profiles ./profiles
COPY models ./models
RUN pip install --no-cache-dir -c constraints.txt --no-deps --no-build-isolation -e .

EXPOSE 8000
CMD ["python", "-m", "services.gateway"]
