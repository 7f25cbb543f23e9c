"""The experiment driver: one TOML config (``experiments/*.toml``) → the stage graph over one
run folder (:mod:`.runner`), its report (:mod:`.report`) and published models
(:mod:`.publish`). ``lass-sparse experiment run|report|plan|publish CONFIG``."""
