"""Test harness: `rewardkit ARGS` as one process of an FSDP2 run on CPU processes (gloo).

accelerate only enters FSDP from a GPU state, so on CPUs an FSDP configuration
silently runs as plain data parallelism. This harness does what `accelerate
launch --config_file rewardkit/accelerate_configs/fsdp.yaml` does (the
shipped configuration's settings as FSDP_* variables), then pins the
accelerator to FSDP, so accelerate's real FSDP2 preparation and torch's
fully_shard run on gloo. Start it with torchrun.
"""

import os
import sys
from pathlib import Path

import yaml

config = yaml.safe_load((Path(__file__).resolve().parents[1] / "rewardkit" / "accelerate_configs" / "fsdp.yaml").read_text())
fsdp = config["fsdp_config"]
os.environ.update(
    ACCELERATE_USE_CPU="true",
    ACCELERATE_USE_FSDP="true",
    FSDP_VERSION=str(fsdp["fsdp_version"]),
    FSDP_RESHARD_AFTER_FORWARD=str(fsdp["fsdp_reshard_after_forward"]).lower(),
    FSDP_AUTO_WRAP_POLICY=fsdp["fsdp_auto_wrap_policy"],
    FSDP_OFFLOAD_PARAMS=str(fsdp["fsdp_offload_params"]).lower(),
    FSDP_CPU_RAM_EFFICIENT_LOADING=str(fsdp["fsdp_cpu_ram_efficient_loading"]).lower(),
    FSDP_STATE_DICT_TYPE=fsdp["fsdp_state_dict_type"],
)

import accelerate  # noqa: E402
from accelerate import FullyShardedDataParallelPlugin  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_init = accelerate.Accelerator.__init__


def _fsdp_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as under accelerate launch
    type(self.state).distributed_type = property(lambda s: DistributedType.FSDP, lambda s, v: None)


accelerate.Accelerator.__init__ = _fsdp_init

from rewardkit.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
