"""Commands that apply a labeler to an existing dataset: label, eval-labeler."""

from __future__ import annotations

import click

_LABELER_HELP = ("Labeler: 'builtin', a cifar5m labeler directory, a transformers image-classification "
                 "model (Hub id[@revision] or directory), or timm:MODEL_NAME:CHECKPOINT.")


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command("label")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--labeler", required=True, help=_LABELER_HELP)
@click.option("--keep-as", default=None,
              help="Index column for the current labels [default: label_v<current index version>].")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per labeler forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available, else cpu), cpu, cuda:N.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also write the confusion matrix as a PNG here.")
def label_cmd(root, labeler, keep_as, batch_size, device, plot) -> None:
    """Relabel the dataset ROOT with another labeler; its shards are not touched.

    Writes a new version of index.parquet whose label, confidence and probs columns
    come from --labeler; the current labels stay in a named column (--keep-as).
    Prints the agreement between the two and the per-class confusion. A killed
    run resumes where it stopped.

    \b
    Examples:
      cifar5m label data/cifar5m --labeler aaraki/vit-base-patch16-224-in21k-finetuned-cifar10
      cifar5m label data/gen --labeler timm:resnet18:resnet18-cifar10.safetensors --keep-as label_builtin
    """
    from cifar5m.generator.relabel import format_report, label_dataset, plot_confusion
    from cifar5m.shards.format import INDEX_NAME
    from cifar5m.shards.index import read_index
    from cifar5m.shards.label_columns import index_meta

    if keep_as is None:
        meta = index_meta(read_index(f"{root}/{INDEX_NAME}", columns=["key"]))
        keep_as = f"label_v{meta['version']}"
    report = label_dataset(root, labeler, keep_as=keep_as, device=_device(device), batch_size=batch_size)
    click.echo(format_report(report))
    click.echo(f"labelled {report['samples']:,} samples in {report['seconds']:.1f} s; "
               f"the previous labels are in index column {report['kept_as']!r}")
    if plot:
        click.echo(f"confusion matrix: {plot_confusion(report, plot)}")


@click.command("eval-labeler")
@click.argument("root")
@click.option("--labeler", required=True, help=_LABELER_HELP)
@click.option("--split", default="test", show_default=True, help="Split whose labels are the reference.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per labeler forward pass.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate on the first this-many samples only.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available, else cpu), cpu, cuda:N.")
def eval_labeler_cmd(root, labeler, split, batch_size, limit, device) -> None:
    """Accuracy of a labeler on the labelled split of ROOT, with time and images/s.

    ROOT is a dataset (local or URL) with real labels: CIFAR-10 imported from the
    python batches (`cifar5m import cifar-10-batches-py --out data/cifar10`) is the
    reference a published accuracy is measured on.

    \b
    Example:
      cifar5m eval-labeler --labeler aaraki/vit-base-patch16-224-in21k-finetuned-cifar10 data/cifar10
    """
    from cifar5m.generator.relabel import evaluate

    dev = _device(device)
    ev = evaluate(root, labeler, split=split, device=dev, batch_size=batch_size, limit=limit)
    click.echo(f"accuracy {ev.accuracy:.2%} ({ev.correct:,} / {ev.samples:,}) on {split} of {root}")
    click.echo("per class: " + ", ".join(f"{n} {c:.1%}" for n, c in zip(ev.class_names, ev.per_class,
                                                                         strict=True)))
    click.echo(f"{ev.seconds:.2f} s, {ev.images_per_s:,.0f} img/s on {dev} at batch {batch_size} "
               f"(+{ev.load_seconds:.1f} s loading)")
