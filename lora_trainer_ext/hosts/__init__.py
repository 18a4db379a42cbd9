"""Hosts: the program that holds the model, behind one small interface (`host.Host`).

host is the protocol and the model kinds; checkpoint reads a checkpoint file and its config, models
builds the ldm/sgm and CLIP modules from it, standalone is the headless host over them (the CLI's and
the standalone app's), standalone_render its sampler for grids, prompt the WebUI's 75-token chunking.
The WebUI's host is `webui/host.py`, the only other one.
May import: the foundations and training's network-free helpers; never a front end or the WebUI.
"""
