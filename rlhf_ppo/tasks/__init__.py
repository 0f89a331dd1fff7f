"""The demos built on the library: the built-in tiny assets (:mod:`.tiny`), the quickstart
(:mod:`.quickstart`), the arithmetic reasoning task (:mod:`.reasoning`) and its agentic variant
with a calculator tool (:mod:`.calculator`), each a list of stages run by one stage runner
(:mod:`.stages`), and the guessing game of the SmolLM2 agent example (:mod:`.guess`). The
library never imports this package; it reaches the tiny assets by name through
:mod:`rlhf_ppo.assets`."""
