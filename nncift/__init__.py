"""nncift: distributed NN-CIFT (neural-network influence estimation for instruction-tuning data).

Public API: :class:`RunConfig` / :func:`load_config`, :class:`Runner` (runs the stages of a run directory),
:class:`InfluenceNetwork`, :func:`select_subset`, and :func:`nncift.influence.register` for new teachers.
"""

from nncift.config import RunConfig, load_config
from nncift.runner import Runner
from nncift.selection.greedy import select_subset
from nncift.surrogate.network import InfluenceNetwork

__version__ = "0.1.0"
__all__ = ["InfluenceNetwork", "RunConfig", "Runner", "__version__", "load_config", "select_subset"]
