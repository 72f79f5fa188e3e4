"""Entry point: `python run_pipeline.py extract --data DIR` and the other stages."""

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
