"""LoRA Maker: build a LoRA dataset, train a LoRA/LoCon and test it, inside the AUTOMATIC1111 WebUI.

Only `lora_trainer_ext.webui` imports the WebUI's `modules.*`; everything else runs headless too
(`python -m lora_trainer_ext --help`). Import-time work is kept to nothing: the WebUI imports this on start.
"""

__version__ = "0.1.0"
