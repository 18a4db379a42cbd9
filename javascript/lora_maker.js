// LoRA Maker's browser side. Loaded by the WebUI as a plain <script>: every global is prefixed.

// Refresh the txt2img Lora cards after new LoRA files were written (the WebUI's hidden refresh button).
function loraMakerRefreshLoraCards() {
    const button = gradioApp().getElementById("txt2img_lora_extra_refresh_internal");
    if (button) button.dispatchEvent(new Event("click"));
}
