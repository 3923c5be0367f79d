"""nncift: distributed NN-CIFT (neural-network influence estimation for instruction-tuning data).

Public API: :class:`RunConfig` / :func:`load_config`, :class:`Pipeline`, :class:`InfluenceNetwork`,
:func:`select_subset`.
"""

from nncift.config import RunConfig, load_config
from nncift.network import InfluenceNetwork
from nncift.pipeline import Pipeline
from nncift.select import select_subset

__version__ = "0.1.0"
__all__ = ["InfluenceNetwork", "Pipeline", "RunConfig", "__version__", "load_config", "select_subset"]
