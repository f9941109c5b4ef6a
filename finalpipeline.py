"""Full run: prompt -> HunyuanVideo -> Real-ESRGAN -> MP4.  `python finalpipeline.py --prompt "a red fox"`"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="finalpipeline.py", upscale=True,
                  description="Full run: generate a video from a prompt, upscale it with Real-ESRGAN "
                              "(4x by default) and write an H.264 MP4."))
