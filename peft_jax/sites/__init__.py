"""What both front-ends share: planning which methods go on which sites, and running a site.

`nnx.py` and `linen.py` only translate their layers into sites (`LinearSite` / `ModuleSite`),
their variables into dicts, and their calls into ``call(x)``; everything else is here.
"""

from peft_jax.sites.layers import conv_op, describe
from peft_jax.sites.plan import AdapterPlan, SitePlan, plan_adapter
from peft_jax.sites.run import attend_site, count_shared, init_shared, merge_site, run_site, unmerge_site

__all__ = ["AdapterPlan", "SitePlan", "attend_site", "conv_op", "count_shared", "describe", "init_shared", "merge_site",
           "plan_adapter", "run_site", "unmerge_site"]
