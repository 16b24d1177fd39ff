"""The training program on top of the library: the Accelerate loop (:mod:`.loop`), running a recipe end to end
(:mod:`.fit`) and the quickstart (:mod:`.quickstart`). The library (everything else under ``vldistill``) never
imports this package; ``tests/test_layering.py`` checks that."""
