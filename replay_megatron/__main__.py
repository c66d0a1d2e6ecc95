"""`python -m replay_megatron` == the `replay-megatron` console script."""
import sys

from replay_megatron.cli.main import main

sys.exit(main())
