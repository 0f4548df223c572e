"""The ``dqtool`` command line: a thin layer mapping options onto stage configs.

Each subcommand builds a frozen config dataclass (which validates itself), calls the
stage function, and prints a short result. A :class:`DQToolError` becomes one line on
stderr and exit code 2; nothing else about a stage lives here.
"""

from __future__ import annotations

import sys

import click

from dqtool import __version__
from dqtool.errors import DQToolError


class _Group(click.Group):
    """Click group that reports DQToolError as one line and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DQToolError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dqtool")
def main() -> None:
    """dqtool: make pretrained seq2seq transformers small and fast (DQ-BART).

    Stages: distill (layer copy) -> qat -> convert -> export -> bench.
    """


def _map_option(value: str | None) -> tuple[int, ...] | None:
    from dqtool.layermap import parse_map

    return None if value is None else tuple(parse_map(value))


@main.command()
@click.argument("teacher")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--encoder-layers", type=int, default=None,
              help="Student encoder depth (default: the teacher's).")
@click.option("--decoder-layers", type=int, default=None,
              help="Student decoder depth (default: the teacher's).")
@click.option("--layer-map", "map_scheme", type=click.Choice(["sft", "dqbart"]), default="sft", show_default=True,
              help="Which teacher layers to keep: 'sft' spreads them over the stack keeping first and last "
                   "(12->6 keeps 0,2,4,7,9,11); 'dqbart' uses the DQ-BART code's maps (6->1 keeps the last layer).")
@click.option("--encoder-map", default=None,
              help="Explicit teacher encoder layers to copy, comma-separated (e.g. 0,2,5); overrides --layer-map.")
@click.option("--decoder-map", default=None,
              help="Explicit teacher decoder layers to copy, comma-separated (e.g. 0); overrides --layer-map.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new student is complete).")
def distill(teacher, out, encoder_layers, decoder_layers, map_scheme, encoder_map, decoder_map, force):
    """Copy TEACHER's layers into a shallower student saved in OUT.

    TEACHER is a Hugging Face hub id or a local folder written by save_pretrained.
    """
    from dqtool.distill import DistillConfig, distill as run_distill

    enc_map, dec_map = _map_option(encoder_map), _map_option(decoder_map)
    cfg = DistillConfig(
        encoder_layers=encoder_layers if encoder_layers is not None else (len(enc_map) if enc_map else None),
        decoder_layers=decoder_layers if decoder_layers is not None else (len(dec_map) if dec_map else None),
        encoder_map=enc_map, decoder_map=dec_map, map_scheme=map_scheme)
    result = run_distill(teacher, out, cfg, force=force)
    click.echo(f"student written to {result.out_dir}")
    click.echo(f"  encoder layers copied: {result.encoder_map}")
    click.echo(f"  decoder layers copied: {result.decoder_map}")
    click.echo(f"  parameters: {result.student_params:,} (teacher {result.teacher_params:,}, "
               f"{result.student_params / result.teacher_params:.2f}x)")
