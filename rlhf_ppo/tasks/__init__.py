"""The demos built on the library: the built-in tiny assets (:mod:`.tiny`), the quickstart
(:mod:`.quickstart`) and the arithmetic reasoning task (:mod:`.reasoning`), each a list of stages
run by one stage runner (:mod:`.stages`). The library never imports this package; it reaches the
tiny assets by name through :mod:`rlhf_ppo.assets`."""
