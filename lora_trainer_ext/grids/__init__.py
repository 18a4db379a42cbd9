"""Grids: epoch x weight test grids of a project's saved LoRAs, scored, with a recommendation.

plan picks the cells, renderer is the interface a host renders a cell through (and its infotext),
render runs a plan and keeps the results (grid.json, use_epoch), image draws the labelled grid,
scoring and recommend judge the cells.
May import: the foundations, dataset (captions, tagger) and training.lora_file; never the WebUI (its
renderer lives in webui/render.py, the headless one in hosts/standalone_render.py).
"""
