# Entry point the WebUI loads from scripts/: it only registers callbacks (the WebUI puts the
# extension folder on sys.path while this file runs, so the package imports from there).
from lora_trainer_ext.webui import register

register()
