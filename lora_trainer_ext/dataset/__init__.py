"""Dataset: everything between a booru query and a folder of image + caption pairs the trainer reads.

boorus/scrape/http fetch images, dedupe/trash/report review them, tagger/captioner/hub caption them,
captions/curate/history edit the captions (every edit undoable), images decodes safely.
May import: the package's foundations (errors, files, paths, project, progress). Never torch, the
training engine, grids, hosts or the WebUI: a download or tagging job must not load any of them.
"""
