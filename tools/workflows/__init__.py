"""The shipped example workflows' generator (run it with tools/make_workflows.py): ``settings`` (each
example's case and sampler settings, the Read-me notes in ``notes/``), ``graph`` (the UI-format builder and
shared layout), ``recipes`` (one builder per workflow) and ``thumbnails`` (the cards beside them)."""
