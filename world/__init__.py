"""The embedded default text-to-image world: shapes scenes, tiny CLIP, tiny UNet, checker.

Public API for the serving code (import the submodules; this package imports nothing heavy):

* ``world.pipeline.load_world_pipeline(path=None) -> WorldPipeline`` (diffusers pipeline)
* ``world.clip.load_clip(path)``, ``encode_text(model, prompts)``, ``text_states(model, prompts)``,
  ``clip_score(model, images, prompts)``
* ``world.scenes.parse_caption(text) -> Meaning | None``, ``heldout_captions``,
  ``train_captions``
* ``world.checker.check(image, meaning) -> CheckResult``
* ``world.evaluate.contact_sheet(prompts, images)``, ``world.approx.approx_report(...)``
"""
