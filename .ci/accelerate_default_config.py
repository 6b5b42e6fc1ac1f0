"""Writes accelerate's default config for this machine (what `accelerate config default` writes) unless one exists.

Without any config, `accelerate launch script.py` prints a block of warnings about each option it was not given
(`--num_processes` was set to a value of `0`, ...) before every run. An existing config, the user's, is left as it is.
The file lives where accelerate looks for it: `$HF_HOME/accelerate/default_config.yaml` (`~/.cache/huggingface/...`).
"""

import os

from accelerate.commands.config.config_args import default_config_file
from accelerate.commands.config.default import write_basic_config

if not os.path.isfile(default_config_file):
    write_basic_config(save_location=default_config_file)
    print(f"Wrote accelerate's default config for this machine to {default_config_file} (see `accelerate config`)")
