"""Entry points: one thin module per command (argparse -> the library's options object -> the library call).

    build.py   adaskip-build     run.py     adaskip-run      verify.py  adaskip-verify
    bench.py   adaskip-bench     eval.py    adaskip-eval     deploy.py  adaskip-deploy
    serve.py   adaskip-serve     eval_summary.py  adaskip-eval-summary
    common.py  one-line errors, quiet libraries
"""
