"""The benchmark: a held-out split of a build (``build``), its scorers (``metrics``,
``judge``, ``score``) and reference predictions (``baselines``).

Entry points: ``build.build_bench``, ``build.held_out_videos`` (for the training
export), ``score.score_bench``, ``baselines.run_baseline``; CLI: ``cli.add_bench_commands``.
"""
