// LoRA Maker's browser side. Loaded by the WebUI as a plain <script>: every global is prefixed.

// Refresh the txt2img Lora cards after new LoRA files were written (the WebUI's hidden refresh button).
function loraMakerRefreshLoraCards() {
    const button = gradioApp().getElementById("txt2img_lora_extra_refresh_internal");
    if (button) button.dispatchEvent(new Event("click"));
}

function loraMakerClick(id) {
    const button = gradioApp().querySelector("#" + id);
    if (button) button.click();
}

// The job panel is driven by polling: a plain request each second while a job runs (every 3 s when
// idle, and right after a click in the tab, which may have started one), so it survives a dropped
// websocket, and a reloaded page re-attaches to the running job.
var loraMakerPoll = {last: 0, busySince: 0, job: "", progressTask: ""};

function loraMakerTick() {
    const status = gradioApp().querySelector("#lora_maker_job_status");
    const state = status ? status.dataset.state : "idle";
    const now = Date.now();
    if (document.hidden || (state !== "running" && now - loraMakerPoll.last < 3000)) return;
    loraMakerPoll.last = now;
    loraMakerClick("lora_maker_job_poll");
}

// After each panel update: when a job ends, refresh the Lora cards; on a training job inside the
// WebUI, also show the WebUI's own progress bar for its task.
function loraMakerJobUpdated() {
    const status = gradioApp().querySelector("#lora_maker_job_status");
    if (!status) return;
    const job = status.dataset.job + ":" + status.dataset.state;
    if (job === loraMakerPoll.job) return;
    const wasRunning = loraMakerPoll.job.endsWith(":running");
    loraMakerPoll.job = job;
    if (wasRunning && status.dataset.state !== "running" && status.dataset.kind === "train") loraMakerRefreshLoraCards();
    const task = status.dataset.taskId;
    const bar = gradioApp().querySelector("#lora_maker_progress");
    if (status.dataset.state === "running" && task && task !== loraMakerPoll.progressTask && bar &&
        typeof requestProgress === "function") {
        loraMakerPoll.progressTask = task;
        requestProgress(task, bar, null, function () {});
    }
}

onUiLoaded(function () {
    const panel = gradioApp().querySelector("#lora_maker_job_panel");
    if (!panel) return; // the tab could not be built: it shows why instead
    setInterval(loraMakerTick, 1000);
    gradioApp().querySelector("#tab_lora_maker").addEventListener("click", function (event) {
        if (event.target.closest("button") && !event.target.closest("#lora_maker_job_poll")) {
            setTimeout(function () { loraMakerClick("lora_maker_job_poll"); }, 500);
        }
    });
    new MutationObserver(loraMakerJobUpdated).observe(panel, {childList: true, subtree: true, attributes: true});
});
