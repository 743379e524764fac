"""Does a trained T-JEPA predictor use the context? Compares the latent loss of a checkpoint on test rows when each
row's targets are predicted from its own context and from the context of another row (rows shuffled), at the
checkpoint and at its random init, and prints how much the target tokens vary over rows against their size.

    python benchmarks/tjepa_context.py --workdir /tmp/probe_run [--rows 512]

If both losses are equal, the predictor has learned only what does not depend on the row (each target position's mean
token): the latent prediction task is then solved without reading the context, and the encoder gets no signal from it.
Dropout is off for the comparison.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True, help='a T-JEPA training workdir (config.json + checkpoints)')
    parser.add_argument('--rows', type=int, default=512)
    args = parser.parse_args()

    from jaxssl import checkpoint as checkpoint_lib
    from jaxssl.evaluate.__main__ import load_run_config
    from jaxssl.methods import tjepa

    config = load_run_config(args.workdir, ['model.dropout=0.0', 'model.predictor_dropout=0.0'])
    method = tjepa.Method(config)
    example = jax.tree.map(jnp.asarray, method.example_batch(1))
    init = lambda key: dict(zip(('params', 'extra'), method.init(key, example), strict=True))
    checkpointer = checkpoint_lib.Checkpointer(args.workdir, 3, async_save=False)
    step = checkpointer.latest_step()
    trained = checkpointer.restore_subset(step, jax.eval_shape(init, jax.random.key(0)))
    checkpointer.close()

    rng = np.random.default_rng(0)
    rows = method.data.rows[method.data.splits['test']][: args.rows]
    batch = jax.tree.map(jnp.asarray, {'row': rows, **method.sample_masks(len(rows), rng)})
    other = jnp.asarray(rng.permutation(len(rows)))

    @jax.jit
    def losses(params, extra):
        full, _ = method.encoder.apply({'params': extra['target_encoder']}, batch['row'])
        positions, mask = method._context(batch)
        target_positions = batch['target_idx'] + method.reg_tokens
        targets = method.regression_targets(full, target_positions)  # as the training loss (loss.target_norm)

        def loss(context_rows):
            context, _ = method.encoder.apply({'params': params['encoder']}, context_rows, positions, mask)
            prediction = method.predictor.apply(
                {'params': params['predictor']}, context, positions, mask, target_positions, batch['target_valid']
            )
            return tjepa.latent_mse(prediction, targets, batch['target_valid'])

        tokens = full[:, method.reg_tokens :]
        spread = jnp.mean(jnp.std(tokens, axis=0)) / jnp.mean(
            jnp.linalg.norm(tokens, axis=-1) / np.sqrt(tokens.shape[-1])
        )
        return loss(batch['row']), loss(batch['row'][other]), spread

    print(f'{args.workdir} (step {step}), {len(rows)} test rows of {method.data.table.name}')
    for name, state in (('trained', trained), ('random init', init(jax.random.key(config.seed)))):
        own, shuffled, spread = (float(v) for v in losses(state['params'], state['extra']))
        print(
            f'{name:12s} loss with own context {own:.5f} | with another row context {shuffled:.5f} | '
            f'target tokens: spread over rows / rms size {spread:.4f}'
        )


if __name__ == '__main__':
    main()
