"""Smoke run: prompt -> video, no upscale.  `python test.py --model tiny --prompt "a red fox"`"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="test.py", upscale=False,
                  description="Smoke run: generate a video from a prompt, without upscaling."))
