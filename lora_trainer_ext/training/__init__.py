"""Training: a project's dataset, a host's model and settings in; LoRA files out.

settings (versioned, migrated on load), presets and vram describe a run; plan counts its steps (the one
count the tab, the API and the trainer show); data/buckets feed it, latents/text_cache cache its inputs,
network (open_clip_lora for OpenCLIP's fused attention)/lora_file make and write the LoRA, objective/
schedules are the maths, model_mode prepares the host's model, trainer runs the loop and run_files
writes what it keeps.
May import: the foundations, dataset (captions, curate, images) and the `hosts.host` protocol; never a
front end or the WebUI. torch is imported by the engine modules only, not by settings, presets or plan.
"""
