"""A PyTorch VideoMAE checkpoint -> a jaxssl params directory, and back.

    python -m jaxssl.convert IN_FILE OUT_DIR [--variant B] [--kind auto|pretrain|classifier|encoder]
        [--frames 16] [--image-size 224] [--allow-missing] [--export-safetensors OUT.safetensors]
    python -m jaxssl.convert --to-torch PARAMS_DIR OUT.safetensors

IN_FILE is read safely (.pth / .pt / .bin without running pickled code, or .safetensors); the variant, kind and
sizes are read off the weights and checked against --variant; OUT_DIR gets the Orbax params and
jaxssl_params.json (see jaxssl.params_io). Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jaxssl import params_io
from jaxssl.convert import io
from jaxssl.convert import videomae as convert
from jaxssl.models.videomae import VideoMAEClassifier, VideoMAEPretrain, count_params

_HF_MARKERS = ('videomae.', 'embeddings.patch_embeddings.', 'encoder.layer.')
_MODEL_FIELDS = ('width', 'depth', 'heads', 'mlp_hidden', 'patch', 'tubelet', 'channels', 'pos_embedding')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m jaxssl.convert',
        description='Convert a PyTorch VideoMAE (V2 or transformers) checkpoint into a jaxssl params directory.',
    )
    parser.add_argument('paths', nargs='*', metavar='IN_FILE OUT_DIR', help='checkpoint to read, directory to write')
    parser.add_argument('--variant', help="S, B, L, H, g (or 'B/8', ...); checked against the weights")
    parser.add_argument('--kind', default='auto', choices=('auto', *convert.KINDS))
    parser.add_argument('--frames', type=int, default=16, help='clip length the params are for')
    parser.add_argument('--image-size', type=int, default=224, help='frame side the params are for')
    parser.add_argument('--allow-missing', action='store_true', help='leave out parameters the checkpoint lacks')
    parser.add_argument('--export-safetensors', metavar='OUT.safetensors', help='also write reference-layout weights')
    parser.add_argument(
        '--to-torch', nargs=2, metavar=('PARAMS_DIR', 'OUT.safetensors'), help='the inverse: params -> safetensors'
    )
    return parser


def _torch_layout(kind: str) -> str:
    return {'pretrain': 'pretrain', 'classifier': 'finetune'}.get(kind, 'auto')


def _listing(items: Sequence[str], limit: int = 8) -> str:
    """'decoder.* (17 keys), mask_token': keys grouped by their first dotted part, so a dropped decoder is one item."""
    groups: dict[str, list[str]] = {}
    for item in items:
        groups.setdefault(item.split('.')[0], []).append(item)
    parts = [keys[0] if len(keys) == 1 else f'{head}.* ({len(keys)} keys)' for head, keys in groups.items()]
    more = f' (+{len(parts) - limit} more)' if len(parts) > limit else ''
    return ', '.join(parts[:limit]) + more


def _metadata(conversion: convert.Conversion, args: argparse.Namespace, source: str) -> dict:
    model = conversion.model
    fields = {k: getattr(model, k) for k in _MODEL_FIELDS}
    if isinstance(model, VideoMAEPretrain):
        fields.update({k: getattr(model, k) for k in ('dec_width', 'dec_depth', 'dec_heads', 'dec_mlp_hidden')})
    elif conversion.kind == 'classifier':
        classes = model.num_classes if 'head' in conversion.params else None  # no head, no class count
        fields.update(num_classes=classes, use_mean_pooling=model.use_mean_pooling)
    return dict(
        kind=conversion.kind,
        variant=conversion.variant,
        patch=model.patch,
        tubelet=model.tubelet,
        frames=args.frames,
        image_size=args.image_size,
        source=source,
        model=fields,
        layout='unscanned',
        skipped=conversion.skipped,
        notes=conversion.notes,
    )


def _convert_file(args: argparse.Namespace, in_file: str, out_dir: str) -> str:
    loaded = io.read_checkpoint(in_file)
    conversion = convert.convert_checkpoint(
        loaded.state_dict,
        args.kind,
        args.variant,
        frames=args.frames,
        image_size=args.image_size,
        allow_missing=args.allow_missing,
    )
    source = os.path.abspath(in_file)
    params_io.save_params(out_dir, conversion.params, _metadata(conversion, args, source))
    model = conversion.model
    layout = 'transformers' if any(k.startswith(_HF_MARKERS) for k in loaded.state_dict) else 'reference'
    where = f"under '{loaded.source_key}'" if loaded.source_key else 'at the top level'
    is_classifier = isinstance(model, VideoMAEClassifier) and conversion.kind == 'classifier'
    classes = f', {model.num_classes} classes' if is_classifier else ''
    pos = 'learned position table' if model.pos_embedding == 'learned' else 'fixed sinusoid positions (regenerated)'
    lines = [
        f'Converted {in_file} ({layout} layout, state dict {where}) into {out_dir}: {conversion.kind} '
        f'VideoMAE {conversion.variant} (width {model.width}, depth {model.depth}, patch {model.patch}, '
        f'tubelet {model.tubelet}{classes}), {count_params(conversion.params):,} parameters, '
        f'{pos}, for {args.frames}x{args.image_size}x{args.image_size} clips.'
    ]
    lines += [f' {note[0].upper()}{note[1:]}.' for note in conversion.notes]
    if conversion.skipped:
        lines.append(f' Skipped {len(conversion.skipped)} checkpoint keys: {_listing(conversion.skipped)}.')
    else:
        lines.append(' No checkpoint key was skipped.')
    if loaded.ignored:
        lines.append(f' Ignored non-weight entries: {_listing(loaded.ignored)}.')
    if args.allow_missing:
        lines.append(' Missing parameters were allowed (--allow-missing) and are absent from the output.')
    if args.export_safetensors:
        io.save_torch_safetensors(conversion.params, args.export_safetensors, _torch_layout(conversion.kind))
        lines.append(f' Also wrote reference-layout weights to {args.export_safetensors}.')
    return ''.join(lines)


def _to_torch(params_dir: str, out_file: str) -> str:
    params, metadata = params_io.load_params(params_dir)
    kind = metadata.get('kind', 'unknown')
    io.save_torch_safetensors(params, out_file, _torch_layout(kind))
    return (
        f'Wrote {out_file} from {params_dir}: {kind} VideoMAE {metadata.get("variant")}, '
        f'{count_params(params):,} parameters in the reference state-dict layout.'
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (0, or 2 after printing a one-line error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.paths) != (0 if args.to_torch else 2):
        parser.error('give IN_FILE OUT_DIR, or --to-torch PARAMS_DIR OUT.safetensors')
    try:
        summary = _to_torch(*args.to_torch) if args.to_torch else _convert_file(args, *args.paths)
    except (ValueError, OSError) as err:  # ConversionError is a ValueError; missing / existing files are OSErrors
        message = ' '.join(str(err).split()) or type(err).__name__
        print(f'error: {message}', file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == '__main__':
    sys.exit(main())
