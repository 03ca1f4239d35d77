"""The pack's small world: synthetic scenes with known objects, a scorer that reads them back, and a
tiny SD1.x-layout text-to-image model trained on them, in which each technique's effect can be
measured (the model card and the results: ``world/README.md``)."""
