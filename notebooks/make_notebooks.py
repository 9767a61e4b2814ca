"""Writes the notebooks from their cell sources.

Run ``python notebooks/make_notebooks.py --execute`` to regenerate them with outputs.

The notebooks tell a story with the library; they define no logic of their own.
"""

from __future__ import annotations

import pathlib

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

QUICKSTART = [
    (
        "md",
        "# ifjax quickstart\n\nTrain a small VGG11-BN on (a slice of) the offline CIFAR-10, "
        "discover its channel groups, prune one group with Default pruning and with "
        "Intra-Fusion, and compare accuracy and outputs. Runs on a CPU in a few minutes.",
    ),
    (
        "code",
        "import jax\nimport jax.numpy as jnp\n\nimport ifjax\n"
        "from models import vgg11_bn\nfrom train import data, training\n\n"
        "# the offline copy is sorted by class: draw random subsets, not slices\n"
        "train_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'train'), 10_000)\n"
        "test_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'test'), 2_000)\n"
        "print(len(train_set.labels), 'training images,', len(test_set.labels), 'test images')",
    ),
    ("md", "## Train a small model\n\nWidth multiplier 1/8, three epochs of the fast recipe."),
    (
        "code",
        "model = vgg11_bn(width_multiplier=0.125)\n"
        "variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))\n"
        "batch_size = 128\n"
        "steps = data.steps_per_epoch(len(train_set.labels), batch_size, drop_remainder=True)\n"
        "train_batches = lambda epoch, start: data.batches(\n"
        "    train_set, batch_size, shuffle=True, augment=True, epoch=epoch,\n"
        "    drop_remainder=True, start_step=start)\n"
        "test_batches = lambda: data.batches(test_set, 500, shuffle=False, augment=False)\n"
        "variables, history = training.fit(\n"
        "    model, variables, train_batches=train_batches, eval_batches=test_batches,\n"
        "    epochs=3, steps_per_epoch=steps, optimizer_kind='fast', progress_bar=False)\n"
        "base = training.evaluate(model, variables, test_batches())['top1']\n"
        "print(f'base top-1: {base:.2%}')",
    ),
    ("md", "## Dependency groups\n\nFound by tracing the model; group 0 is nearest the output."),
    (
        "code",
        "x = jnp.zeros((1, 32, 32, 3))\n"
        "groups = ifjax.discover_groups(model, variables, x)\n"
        "for g in groups:\n    print(g.describe())",
    ),
    (
        "md",
        "## Prune one group both ways\n\nBatchNorm is folded first, as in the paper; both "
        "methods keep the same channels, Intra-Fusion merges the others into them.",
    ),
    (
        "code",
        "folded = ifjax.fold_batchnorm(variables, groups)\n"
        "group, sparsity = groups[2], 0.5\n"
        "results = {}\n"
        "for name, pruner in [('default', ifjax.default_pruning(sparsity, 'l1')),\n"
        "                     ('intra_fusion', ifjax.intra_fusion(sparsity, 'l1'))]:\n"
        "    plan = pruner.plan(folded, group)\n"
        "    pruned = pruner.apply(folded, group, plan)\n"
        "    small = model.for_variables(pruned)\n"
        "    results[name] = (small, pruned)\n"
        "    top1 = training.evaluate(small, pruned, test_batches())['top1']\n"
        "    print(f'{name:>12}: {plan.keep.shape[0]} of {group.size} channels kept, '\n"
        "          f'top-1 {top1:.2%} (base {base:.2%})')",
    ),
    ("md", "How far does each pruned model's output move from the unpruned one?"),
    (
        "code",
        "images = next(iter(test_batches()))['image'][:256]\n"
        "reference = model.apply(variables, images)\n"
        "for name, (small, pruned) in results.items():\n"
        "    distance = jnp.linalg.norm(small.apply(pruned, images) - reference, axis=1).mean()\n"
        "    print(f'{name:>12}: mean logit distance to the unpruned model {distance:.3f}')",
    ),
]


def notebook(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    make = {"md": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in cells]
    return nb


NOTEBOOKS = {"quickstart.ipynb": QUICKSTART}


def main() -> None:
    """Writes every notebook; with ``--execute`` runs it and keeps the outputs."""
    import sys

    execute = "--execute" in sys.argv
    for name, cells in NOTEBOOKS.items():
        nb = notebook(cells)
        if execute:
            from nbclient import NotebookClient

            NotebookClient(nb, timeout=1800, kernel_name="python3").execute()
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
