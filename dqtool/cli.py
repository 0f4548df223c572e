"""The ``dqtool`` command line: a thin layer mapping options onto stage configs.

Each subcommand builds a frozen config dataclass (which validates itself), calls the
stage function, and prints a short result. A :class:`DQToolError` becomes one line on
stderr and exit code 2; nothing else about a stage lives here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dqtool.base.version import __version__
from dqtool.base.errors import DQToolError


class _Group(click.Group):
    """Click group that reports DQToolError (and a full disk) as one line and exits 2;
    Ctrl-C is one line (saying how to continue, where a stage knows) and exit 130."""

    def invoke(self, ctx):
        from dqtool.base.fsutil import io_error, is_write_error

        try:
            return super().invoke(ctx)
        except DQToolError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            if not is_write_error(e):
                raise
            click.echo(f"error: {io_error(e)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            click.echo(f"interrupted{': ' + str(e) if str(e) else ''}", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dqtool")
def main() -> None:
    """dqtool: make pretrained seq2seq transformers small and fast (DQ-BART).

    Stages: distill (layer copy) -> qat -> convert -> export -> bench.
    """


def _map_option(value: str | None) -> tuple[int, ...] | None:
    from dqtool.model.layermap import parse_map

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
    from dqtool.stages.distill import DistillConfig, distill as run_distill

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


@main.command("eval")
@click.argument("model")
@click.option("--data", required=True, help="Data: folder of split files (jsonl/csv/tsv), one file, or a datasets folder.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate on.")
@click.option("--preset", type=click.Choice(["greedy", "xsum", "cnndm"]), default="greedy", show_default=True,
              help="Generation settings: greedy, or the BART/DQ-BART XSUM or CNN/DM settings.")
@click.option("--num-beams", type=int, default=None, help="Beams (overrides the preset).")
@click.option("--max-length", type=int, default=None, help="Maximum generated tokens (overrides the preset).")
@click.option("--min-length", type=int, default=None, help="Minimum generated tokens (overrides the preset).")
@click.option("--length-penalty", type=float, default=None, help="Beam length penalty (overrides the preset).")
@click.option("--no-repeat-ngram-size", type=int, default=None,
              help="Forbid repeating n-grams of this size, 0 = off (overrides the preset).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Rows per generate call.")
@click.option("--max-samples", type=int, default=None, help="Evaluate only the first N rows.")
@click.option("--metrics", default="rouge", show_default=True, help="Comma-separated: rouge, bleu (BLEU and chrF).")
@click.option("--source-field", default="source", show_default=True, help="Source text field/column.")
@click.option("--target-field", default="target", show_default=True, help="Reference text field/column.")
@click.option("--source-max-length", type=int, default=512, show_default=True,
              help="Source tokens kept (truncated; also capped at the model's position table).")
@click.option("--prefix", default="", help="Task prefix prepended to every source (T5 style).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--matmul", type=click.Choice(["float", "integer"]), default="float", show_default=True,
              help="Packed folders: float (the QAT model's logits bit for bit) or integer (int8 input codes x "
                   "weight codes, exact int32 sums: faster, equal up to float32 rounding).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write metrics, config and predictions to this JSON file.")
def eval_(model, data, split, preset, num_beams, max_length, min_length, length_penalty, no_repeat_ngram_size,
          batch_size, max_samples, metrics, source_field, target_field, source_max_length, prefix, device, matmul,
          out_path):
    """Generate with MODEL on a data split and print ROUGE (and BLEU/chrF).

    MODEL is a Hugging Face model folder or hub id, a 'dqtool qat' output or a 'dqtool convert' output.
    """
    from dqtool.data.pairs import DataConfig
    from dqtool.stages.evaluate import EvalConfig, evaluate_model

    overrides = {k: v for k, v in dict(num_beams=num_beams, max_length=max_length, min_length=min_length,
                                       length_penalty=length_penalty,
                                       no_repeat_ngram_size=no_repeat_ngram_size).items() if v is not None}
    dcfg = DataConfig(source_field=source_field, target_field=target_field, prefix=prefix,
                      source_max_length=source_max_length)
    cfg = EvalConfig.preset(preset, data=data, split=split, data_cfg=dcfg, batch_size=batch_size,
                            max_samples=max_samples, device=device, matmul=matmul,
                            metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()), **overrides)
    res = evaluate_model(model, out_path, cfg)
    click.echo(f"{model} ({res.model_kind}) on {split}: {len(res.predictions)} rows in {res.seconds:.1f}s")
    for k, v in res.metrics.items():
        click.echo(f"  {k:<10} {v:8.2f}")
    if out_path:
        click.echo(f"  written to {out_path}")


@main.command()
@click.argument("student", type=click.Path(exists=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data", required=True, help="Training data: a folder with train/validation files (jsonl/csv/tsv), "
              "a single file, or a datasets folder saved with save_to_disk.")
@click.option("--teacher", default=None, help="Float teacher to distill from (default: the one recorded by distill).")
@click.option("--wea", default="8-8-8", show_default=True,
              help="Bits for weights-embeddings-activations, e.g. 2-2-8, 4-4-8, 8-8-8, 4-8-none ('none' = float).")
@click.option("--weight-granularity", type=click.Choice(["tensor", "row", "group"]), default="row", show_default=True,
              help="One weight scale per tensor, per output row, or per group of input columns.")
@click.option("--group-size", type=int, default=None, help="Input columns per scale with --weight-granularity group.")
@click.option("--weight-method", type=click.Choice(["minmax", "ternary", "lsq", "seq", "tbt"]), default=None,
              help="Weight quantizer (default: ternary at 2 bits, minmax otherwise): lsq = the minmax grid with a "
                   "learned range per row (at 2 bits a ternary with a learned scale, started at 4/3 mean|w|); "
                   "seq = ParetoQ's four balanced levels +-alpha/4, +-3alpha/4 (2 bits; 3/4 bits: 8/16 levels) with "
                   "a learned alpha per row started at max|w|; tbt = ternary with alpha = 4/3 mean|w| per row.")
@click.option("--act-clip", type=click.Choice(["dynamic", "pact"]), default="dynamic", show_default=True,
              help="Activation range: the dynamic max|x| (per token or per tensor, see --act-granularity) or a "
                   "learned PACT clip per quantizer.")
@click.option("--act-asymmetric", is_flag=True, help="Asymmetric (zero-point) activation quantization.")
@click.option("--act-granularity", type=click.Choice(["token", "tensor", "block"]), default="token", show_default=True,
              help="Dynamic activation range per token (a row's result never depends on its batch), per "
                   "tensor (DQ-BART's per-batch range), or per row and block of K inputs: ONNX Runtime "
                   "MatMulNBits' own int8 input quantizer (A 8; the export then needs no quantize ops).")
@click.option("--act-block-size", type=int, default=None,
              help="Inputs per activation scale with --act-granularity block (default: --group-size, else 32).")
@click.option("--encoder-act-granularity", type=click.Choice(["token", "tensor"]), default=None,
              help="Activation range of the Linears that run over all source tokens (encoder, cross-attention "
                   "keys/values), default: as --act-granularity. With --act-granularity block, 'token' puts them on "
                   "ONNX Runtime's integer MatMul (much faster over many rows) and keeps MatMulNBits per token.")
@click.option("--no-attention-quant", is_flag=True, help="Leave the attention matmul inputs (q, k, probs, v) in float.")
@click.option("--pos-bits", default="none", show_default=True,
              help="Learned position tables (BART, mBART): 'e' = quantized per row at the embedding bits, a bit "
                   "width (8, 4, 3, 2), or 'none' = float. Fixed or relative positions have nothing to quantize.")
@click.option("--loss-task", type=float, default=1.0, show_default=True, help="Weight of the cross-entropy task loss.")
@click.option("--loss-logits", type=float, default=1.0, show_default=True, help="Weight of the logits distillation loss.")
@click.option("--logits-loss", "logits_kind", type=click.Choice(["mse", "kl"]), default="kl", show_default=True,
              help="Logits loss: KL with --temperature (best measured here) or MSE (the paper).")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Temperature of the KL logits loss.")
@click.option("--loss-hidden", type=float, default=0.0, show_default=True,
              help="Weight of the per-layer hidden-state MSE (embedding output included; the paper uses 1).")
@click.option("--loss-attention", type=float, default=0.0, show_default=True,
              help="Weight of the attention-probability MSE (encoder, decoder, cross; the paper uses 1).")
@click.option("--loss-enc-last", type=float, default=0.0, show_default=True,
              help="Weight of the encoder last-hidden-state MSE (the paper uses 1).")
@click.option("--max-steps", type=int, default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Per-device batch size.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--lr", "learning_rate", type=float, default=1e-4, show_default=True, help="Peak learning rate (linear decay).")
@click.option("--warmup-ratio", type=float, default=0.05, show_default=True, help="Fraction of steps for LR warm-up.")
@click.option("--source-max-length", type=int, default=256, show_default=True, help="Source tokens kept (truncated).")
@click.option("--target-max-length", type=int, default=64, show_default=True, help="Target tokens kept (truncated).")
@click.option("--source-field", default="source", show_default=True, help="Source text field/column.")
@click.option("--target-field", default="target", show_default=True, help="Target text field/column.")
@click.option("--prefix", default="", help="Task prefix prepended to every source (T5 style, e.g. 'summarize: ').")
@click.option("--targets", type=click.Choice(["data", "teacher"]), default="data", show_default=True,
              help="Train on the references, or on the teacher's own outputs for the training sources "
                   "(sequence-level distillation, generated once before training).")
@click.option("--max-train-samples", type=int, default=None, help="Use only the first N training rows.")
@click.option("--on-too-long", type=click.Choice(["truncate", "skip", "error"]), default="truncate", show_default=True,
              help="Rows longer than the max lengths: truncate them, skip them (counted), or stop with an error.")
@click.option("--eval-steps", type=int, default=None,
              help="Evaluate ROUGE every N steps and keep the best checkpoint (must divide --save-steps).")
@click.option("--eval-samples", type=int, default=200, show_default=True, help="Validation rows used per evaluation.")
@click.option("--save-steps", type=int, default=200, show_default=True, help="Checkpoint every N steps (for --resume).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed for init, data order and dropout.")
@click.option("--precision", type=click.Choice(["auto", "no", "fp16", "bf16"]), default="auto", show_default=True,
              help="Mixed precision: auto = bf16/fp16 on CUDA, fp32 on CPU.")
@click.option("--gradient-checkpointing", is_flag=True, default=False,
              help="Recompute each layer's activations during the backward: activation memory of about one layer "
                   "instead of all of them, about 30% more compute.")
@click.option("--teacher-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True,
              help="Storage dtype of the frozen teacher: auto = bfloat16 under bf16 mixed precision (GPU), else float32.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint in OUT.partial/.")
@click.option("--force", is_flag=True, help="Replace OUT (and any interrupted run) if it exists.")
def qat(student, out, data, teacher, wea, weight_granularity, group_size, weight_method, act_clip, act_asymmetric,
        act_granularity, act_block_size, encoder_act_granularity, no_attention_quant, pos_bits, loss_task, loss_logits, logits_kind, temperature, loss_hidden, loss_attention,
        loss_enc_last, resume, force, **train):
    """Quantization-aware fine-tuning of STUDENT with distillation; writes OUT.

    STUDENT is a folder from 'dqtool distill' (its layer map pairs student and teacher
    layers). Checkpoints go to OUT.partial/ until training completes.
    """
    from dqtool.model.losses import LossConfig
    from dqtool.stages.qat import QATConfig, qat as run_qat
    from dqtool.qmath.scheme import QuantScheme

    scheme = QuantScheme.from_wea_pos(wea, pos_bits, weight_granularity=weight_granularity, weight_group_size=group_size,
                                      weight_method=weight_method, act_clip=act_clip, act_symmetric=not act_asymmetric,
                                      act_granularity=act_granularity, act_block_size=act_block_size,
                                      encoder_act_granularity=encoder_act_granularity,
                                      quantize_attention=not no_attention_quant)
    losses = LossConfig(task=loss_task, logits=loss_logits, hidden=loss_hidden, attention=loss_attention,
                        enc_last=loss_enc_last, logits_kind=logits_kind, temperature=temperature)
    cfg = QATConfig(data=data, scheme=scheme, losses=losses, **train)
    result = run_qat(student, out, cfg, teacher=teacher, force=force, resume=resume)
    if not result.main:
        return  # another process of a multi-process run: the main one reports
    click.echo(f"QAT student ({scheme.wea}) written to {result.out_dir}: {result.steps} steps in {result.seconds:.0f}s"
               + (f", best rougeL {result.best_metric:.2f}" if result.best_metric is not None else ""))


def _kb(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,} bytes ({n / 1024:.1f} KiB)"


@main.command()
@click.argument("qat_dir", metavar="QAT", type=click.Path(exists=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--float-dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True,
              help="Dtype of what stays in floating point (norms, biases, positions): auto = float16 when the packed "
                   "model stays within --tolerance of the QAT model with identical greedy tokens, else float32.")
@click.option("--tolerance", type=float, default=1e-3, show_default=True,
              help="Largest max|dlogit| / max|logit| that --float-dtype auto accepts for float16.")
@click.option("--check-samples", type=int, default=8, show_default=True,
              help="Random check inputs compared between the QAT and the packed model.")
@click.option("--ternary-storage", type=click.Choice(["base3", "2bit"]), default="base3", show_default=True,
              help="2-bit code tables on disk: base3 = five codes per byte (1.6 bits per weight), decoded exactly to "
                   "the 2-bit layout at load (ONNX: folded at session start); 2bit = four per byte.")
@click.option("--teacher", default=None,
              help="fp32 teacher folder for the compression ratio (default: the teacher the QAT manifest records).")
@click.option("--weight-cache", type=click.Choice(["model", "generate", "none"]), default="model", show_default=True,
              help="How the float-dtype check keeps quantized weights between forwards: model = computed once "
                   "(fast, a float copy in memory), none = recomputed every forward (least memory, minutes at "
                   "BART-base).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new folder is complete).")
def convert(qat_dir, out, float_dtype, tolerance, check_samples, ternary_storage, teacher, weight_cache, force):
    """Pack the fake-quant weights of a 'dqtool qat' folder QAT into true integers in OUT.

    Prints the footprint: the weights file, the bit-count bound of the scheme, and the
    ratio to the fp32 teacher checkpoint.
    """
    from dqtool.stages.convert import ConvertConfig, convert as run_convert

    cfg = ConvertConfig(float_dtype=float_dtype, tolerance=tolerance, check_samples=check_samples, teacher=teacher,
                        ternary_storage=ternary_storage, weight_cache=weight_cache)
    r = run_convert(qat_dir, out, cfg, force=force)
    f, c = r.footprint, r.check
    click.echo(f"packed student ({r.wea}) written to {r.out_dir}")
    click.echo(f"  weights file   {_kb(f['packed_file_bytes'])}")
    b = f["bound"]
    click.echo(f"  bit bound      {_kb(b['total'])}; file is {100 * f['over_bound']:.1f}% above")
    for group in ("codes", "scales", "floats", "positions"):
        click.echo(f"    {group:<10} {b.get(group, 0):>14,} bytes ({100 * b.get(group, 0) / max(b['total'], 1):5.1f}%)")
    click.echo(f"  fp32 teacher   {_kb(f['teacher_fp32_bytes'])}"
               + (f" -> {f['ratio_to_teacher']:.2f}x smaller" if f['ratio_to_teacher'] else " (teacher not found)"))
    groups = ", ".join(f"{g} {d}" for g, d in r.float_dtypes.items())
    click.echo(f"  floats stored as {r.float_dtype}{f' ({groups})' if groups else ''}; packed vs QAT logits: max |d| {c['max_abs']:.3g}"
               f"{' (bit-exact)' if c['bit_exact'] else ''}, greedy tokens "
               f"{'identical' if c['tokens_equal'] else 'DIFFER'} on {c['samples']} check inputs")


@main.command()
@click.argument("packed", type=click.Path(exists=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--matmul", type=click.Choice(["auto", "integer", "nbits"]), default="auto", show_default=True,
              help="Quantized Linear op: integer = MatMulInteger on int8 activation codes (bit-faithful, fast for many "
                   "rows), nbits = MatMulNBits (weight-only / group-wise schemes), auto = integer where the scheme "
                   "quantizes activations with per-row or per-tensor weight scales, else nbits.")
@click.option("--lut-gemm", is_flag=True, default=False,
              help="Run eligible 2-bit MatMulNBits with onnxruntime's lookup-table (T-MAC) kernel "
                   "(session option mlas.use_lut_gemm, recorded in export.json; its own activation rounding).")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default="4", show_default=True,
              help="MatMulNBits compute: 4 = int8 (fast), 0 = float (faithful, slower for 2/8 bits).")
@click.option("--nbits-kernel", type=click.Choice(["auto", "weight"]), default="auto", show_default=True,
              help="MatMulNBits width per Linear (accuracy level 4): auto = the fastest measured (8 bits for the "
                   "encoder and cross-attention keys/values, at least 4 per generated token; the same codes, "
                   "re-packed at session start: the file keeps the packed bits), weight = the weights' own bits "
                   "(least memory at run time).")
@click.option("--rtol", type=float, default=2e-2, show_default=True,
              help="Largest max|d|/max|ref| between ORT and the packed PyTorch model the validation accepts.")
@click.option("--external-data", type=click.Choice(["per-graph", "shared"]), default="shared", show_default=True,
              help="per-graph = onnx/<graph>.onnx_data, what transformers.js loads in Node and browsers (the tied "
                   "embedding stored twice); shared = one onnx/weights.onnx_data (stored once; onnxruntime, optimum, "
                   "dqtool and transformers.js in Node load it).")
@click.option("--generation-graph", type=click.Choice(["none", "beam"]), default="none", show_default=True,
              help="beam = also write onnx/generation_model.onnx: the whole generation (greedy = 1 beam, beam search) "
                   "in one graph, ONNX Runtime's BeamSearch op around the same quantized encoder/decoder and weights; "
                   "validated to give the ONNX runtime's tokens.")
@click.option("--decoder-step", type=click.Choice(["lean", "optimum"]), default="lean", show_default=True,
              help="The generation graph's cached decoder step: lean = one MultiHeadAttention node per attention and "
                   "no shape ops (BART, mBART; schemes that keep the attention matmuls in float; elsewhere the optimum "
                   "one), optimum = the merged decoder's cached branch.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new folder is complete).")
def export(packed, out, matmul, accuracy_level, nbits_kernel, lut_gemm, rtol, external_data, generation_graph,
           decoder_step, force):
    """Export a 'dqtool convert' folder PACKED to ONNX (encoder + merged decoder) in OUT.

    Every export is validated against the packed PyTorch model before OUT appears.
    """
    from dqtool.stages.export import ExportConfig, export as run_export

    r = run_export(packed, out, ExportConfig(matmul=matmul, accuracy_level=int(accuracy_level), rtol=rtol,
                                                       nbits_kernel=nbits_kernel, lut_gemm=lut_gemm, external_data=external_data,
                                                       generation_graph=generation_graph, decoder_step=decoder_step),
                   force=force)
    c, s = r.check, r.sizes
    click.echo(f"ONNX student ({r.wea}) written to {r.out_dir}: {r.paths['integer']} Linears as MatMulInteger, "
               f"{r.paths['nbits']} as MatMulNBits")
    click.echo(f"  weights {_kb(s.get('weights'))} (packed file {_kb(s.get('packed_file_bytes'))}), "
               f"graphs {_kb(s.get('graphs'))}, "
               f"folder {_kb(s['total'])}")
    click.echo(f"  vs packed PyTorch: encoder max |d| {c['encoder_max_abs']:.3g}, logits max |d| "
               f"{c['decoder_logits_max_abs']:.3g} ({c['decoder_logits_rel']:.2%}), argmax tokens "
               + ("identical" if c['argmax_equal'] else f"agree at {c['argmax_agreement']:.1%} of positions"))
    if c.get("generation_graph"):
        gg = c["generation_graph"]
        click.echo(f"  generation graph onnx/{gg['file']} ({_kb(gg['bytes'])}, weights shared): "
                   + ", ".join(f"{k} {v}" for k, v in gg.items() if k not in ("file", "bytes", "samples"))
                   + f" on {gg['samples']} check inputs")


def _gates_table(rows: list[dict]) -> str:
    lines = [f"  {'model':<28} {'gate':<18} {'value':>10} {'limit':>10}  result"]
    for g in rows:
        v = "missing" if g["value"] is None else f"{g['value']:.4g}"
        lines.append(f"  {g['model']:<28} {g['gate']:<18} {v:>10} {g['limit']:>10.4g}  {'ok' if g['ok'] else 'FAIL'}")
    return "\n".join(lines)


def _gate_options(f):
    f = click.option("--max-latency", type=float, default=None,
                     help="Gate: decode ms per token (first batch size) at most this.")(f)
    f = click.option("--max-quality-drop", type=float, default=None,
                     help="Gate: (teacher ROUGE-L - model ROUGE-L) / teacher ROUGE-L at most this (0.05 = 5%).")(f)
    f = click.option("--min-ratio", type=float, default=None,
                     help="Gate: fp32 teacher bytes / model bytes at least this.")(f)
    return f


def _finish_gates(results: list[dict]) -> None:
    if not results:
        return
    click.echo("gates:\n" + _gates_table(results))
    if not all(g["ok"] for g in results):
        click.echo("error: a gate failed (see the table above)", err=True)
        sys.exit(1)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report folder (bench.json, bench.md, PNG plots).")
@click.option("--data", default=None, help="Quality data (as for dqtool eval); without it, no quality columns.")
@click.option("--split", default="test", show_default=True, help="Split for quality.")
@click.option("--max-samples", type=int, default=200, show_default=True, help="Rows scored for quality.")
@click.option("--max-length", type=int, default=32, show_default=True, help="Quality: generated tokens (greedy).")
@click.option("--source-tokens", type=int, default=64, show_default=True, help="Latency: source length in tokens.")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Latency: greedy tokens generated.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Latency batch sizes, comma-separated.")
@click.option("--runs", type=int, default=10, show_default=True, help="Timed runs per batch size.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up runs.")
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for torch and ONNX Runtime.")
@click.option("--device", default="cpu", show_default=True,
              help="torch device for PyTorch models (HF, QAT, packed), e.g. cuda; ONNX/CTranslate2 stay on CPU.")
@click.option("--teacher", default=None, help="fp32 teacher folder: size ratios, quality drop, and teacher peers.")
@click.option("--student", default=None, help="Layer-copied fp32 student folder (student peers).")
@click.option("--peers", default="", help="Comma-separated peers to build and measure, e.g. "
              "pytorch-int8-dynamic,ort-fp32,ort-int8-dynamic,ort-int4-rtn,ctranslate2-int8.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_gate_options
def bench(models, out_dir, data, split, max_samples, max_length, source_tokens, new_tokens, batch_sizes, runs, warmup,
          threads, device, teacher, student, peers, no_plots, force, min_ratio, max_quality_drop, max_latency):
    """Footprint, latency and quality of MODELS (any folders dqtool eval takes), the teacher and peers."""
    from dqtool.stages.bench.stage import BenchConfig, Gates, bench as run_bench, check_gates

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError as e:
        raise DQToolError(f"--batch-sizes '{batch_sizes}' must be comma-separated integers") from e
    cfg = BenchConfig(data=data, split=split, max_samples=max_samples, max_length=max_length,
                      source_tokens=source_tokens, new_tokens=new_tokens, batch_sizes=sizes, runs=runs,
                      warmup=warmup, threads=threads, device=device, teacher=teacher, student=student,
                      peers=tuple(p.strip() for p in peers.split(",") if p.strip()), plots=not no_plots)
    r = run_bench(list(models), out_dir, cfg, force=force, log=lambda m: click.echo(m, err=True))
    click.echo((Path(r.out_dir) / "bench.md").read_text())
    _finish_gates(check_gates(r.report, Gates(min_ratio, max_quality_drop, max_latency)))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Validate the recipe and print the plan; run nothing.")
@click.option("--force", is_flag=True, help="Run every stage again, even those already done.")
@_gate_options
def compress(recipe, dry_run, force, min_ratio, max_quality_drop, max_latency):
    """Run distill -> qat -> convert -> export -> bench from RECIPE (YAML); resume what is done.

    Exit code: 0 when every gate holds, 1 when a gate fails, 2 on bad input.
    """
    from dataclasses import replace

    from dqtool.compress import compress as run_compress, load_recipe

    rec = load_recipe(recipe)
    cli = {k: v for k, v in dict(min_ratio=min_ratio, max_quality_drop=max_quality_drop,
                                 max_latency_ms=max_latency).items() if v is not None}
    gates = replace(rec.gates, **cli)
    r = run_compress(rec, gates=gates, dry_run=dry_run, force=force, log=lambda m: click.echo(m, err=True))
    if dry_run:
        return
    click.echo((rec.work / "bench" / "bench.md").read_text())
    _finish_gates(r.gates)


if __name__ == "__main__":
    main()
