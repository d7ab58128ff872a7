"""A test-only vLLM platform: the CPU platform with a device resource for Ray.

vLLM's CPU platform has no `ray_device_key`, so its Ray executor refuses to
start there ("current platform cpu does not support ray"). A custom Ray resource
does not help: the executor asks Ray which accelerator ids an actor was given
(`get_accelerator_ids()[key]`), which only knows Ray's accelerator names. This
platform names Ray's `GPU` resource, the one the CUDA platform uses, and the test
starts Ray with `num_gpus` equal to the ranks it wants: Ray counts and hands out
that resource whether or not a GPU exists, and CPU torch ignores the
`CUDA_VISIBLE_DEVICES` Ray sets. Everything else is the CPU platform, so the
executor, the workers and the plugin run exactly as under `--distributed-executor-backend
ray` on GPUs, with CPU kernels.

It is activated through vLLM's `vllm.platform_plugins` entry point group, by a
distribution the test writes into a temporary folder on the subprocess's
PYTHONPATH (see `install`), never by the installed package.
"""

from pathlib import Path

from vllm.platforms.cpu import CpuPlatform

ENTRY_POINT = "dllm_ray_cpu = tests.ray_platform:activate"


class RayCpuPlatform(CpuPlatform):
    ray_device_key: str = "GPU"


def activate() -> str:
    return f"{__name__}.RayCpuPlatform"


def install(folder: Path) -> Path:
    """Writes a distribution whose only content is the platform entry point."""
    dist_info = folder / "dllm_ray_cpu_platform-0.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dllm-ray-cpu-platform\nVersion: 0\n")
    (dist_info / "entry_points.txt").write_text(f"[vllm.platform_plugins]\n{ENTRY_POINT}\n")
    return folder
