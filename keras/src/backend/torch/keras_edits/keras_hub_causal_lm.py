"""Companion of KerasHub's `keras_hub/src/models/causal_lm.py` (a change
that would go to KerasHub, whose file it edits; applied like Keras's
companions when KerasHub is imported).

Upstream, `generate()` under `DataParallel` runs its generation function on
prompts split over the batch as DTensors. Here each rank runs it on its own
rows with plain tensors (`distribution/generation.py`).
"""

from keras.src.backend.torch.distribution import generation
from keras.src.backend.torch.distribution.steps import local_replicas
from keras.src.backend.torch.keras_edits import edit
from keras.src.distribution import distribution_lib


def _generating_on_rows(upstream):
    def make_generate_function(self):
        """Stands for `CausalLM.make_generate_function`: the same function,
        run on this rank's rows under `DataParallel`."""
        generate_function = upstream(self)

        def generate(inputs, stop_token_ids=None):
            distribution = distribution_lib.distribution()
            if local_replicas.eligible(distribution) and generation.splits_rows(
                inputs
            ):
                return generation.generate_on_rows(
                    generate_function, inputs, stop_token_ids
                )
            return generate_function(inputs, stop_token_ids=stop_token_ids)

        return generate

    return make_generate_function


def apply(causal_lm_module):
    edit(
        causal_lm_module.CausalLM,
        "make_generate_function",
        _generating_on_rows,
    )
