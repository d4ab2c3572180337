"""`python -m pipeline [overrides]` runs the DAG; see README.md."""

from pipeline.app import main

if __name__ == "__main__":
    main()
