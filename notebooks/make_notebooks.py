"""Writes the notebooks from their cell sources.

Run ``python notebooks/make_notebooks.py --execute`` to regenerate them with outputs
(``... --execute vit_heads.ipynb``: only that one).

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


SETUP = (
    "code",
    "import jax\nimport jax.numpy as jnp\n\nimport ifjax\n"
    "from models import vgg11_bn\nfrom train import data, training\n\n"
    "train_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'train'), 10_000)\n"
    "test_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'test'), 2_000)\n"
    "test_batches = lambda: data.batches(test_set, 500, shuffle=False, augment=False)\n"
    "x = jnp.zeros((1, 32, 32, 3))",
)

TRAIN_SMALL = (
    "code",
    "model = vgg11_bn(width_multiplier=0.125)\n"
    "variables = model.init(jax.random.key(0), x)\n"
    "steps = data.steps_per_epoch(len(train_set), 128, drop_remainder=True)\n"
    "train_batches = lambda epoch, start: data.batches(\n"
    "    train_set, 128, shuffle=True, augment=True, epoch=epoch,\n"
    "    drop_remainder=True, start_step=start)\n"
    "variables, _ = training.fit(\n"
    "    model, variables, train_batches=train_batches, eval_batches=test_batches,\n"
    "    epochs=3, steps_per_epoch=steps, optimizer_kind='fast', progress_bar=False)",
)

DATAFREE = [
    (
        "md",
        "# The data-free sweep\n\nThe paper's Tables 2-3 in miniature: every group of a "
        "small VGG11-BN pruned alone at several sparsities, Default vs Intra-Fusion, no "
        "fine-tuning. Every cell is evaluated in the same-shape masked form, so one compiled "
        "evaluation function serves the whole sweep. The full-size version is "
        "`ifjax datafree`.",
    ),
    SETUP,
    TRAIN_SMALL,
    (
        "code",
        "from train import paper, sweep\n\n"
        "rows = sweep.datafree_sweep(\n"
        "    model, variables, sweep.eval_batch_list(test_set), example_input=x,\n"
        "    sparsities=(0.1, 0.3, 0.5, 0.7), importances=('l1', 'lamp'), paper_lamp=True,\n"
        "    progress=False)\n"
        "rows = sweep.add_paper_columns(rows, paper.paper_datafree('vgg11_bn', 'cifar10'))\n"
        "agree, total = sweep.sign_agreement(rows)\n"
        "print(f'gain has the paper sign in {agree} of {total} cells')",
    ),
    ("md", "The table in the paper's layout (the paper's gain beside ours, for width 1):"),
    (
        "code",
        "from IPython.display import Image, Markdown\n\n"
        "Markdown(sweep.markdown_table(rows, title='VGG11-BN x0.125, 3 epochs, 10k images'))",
    ),
    (
        "code",
        "Image(str(sweep.plot_datafree(rows, 'datafree.png')))",
    ),
    (
        "md",
        "## Which solver?\n\nThe exact solver is what the paper used. Entropic Sinkhorn "
        "(ott-jax, jit-compiled) blurs the map; here is what that costs on one group.",
    ),
    (
        "code",
        "groups = ifjax.discover_groups(model, variables, x)\n"
        "folded = ifjax.fold_batchnorm(variables, groups)\n"
        "for options in ({'solver': 'exact'}, {'solver': 'sinkhorn', 'epsilon': 1e-3},\n"
        "                {'solver': 'sinkhorn', 'epsilon': 1e-2},\n"
        "                {'map_normalization': 'row_average'}):\n"
        "    pm, pv, (plan,) = ifjax.prune(model, folded, groups[2], sparsity=0.5, fold=False,\n"
        "                                  **options)\n"
        "    top1 = training.evaluate(pm, pv, test_batches())['top1']\n"
        "    print(f'{options}: top-1 {top1:.2%} (converged: {bool(plan.converged)})')",
    ),
]

SPLIT_FUSION = [
    (
        "md",
        "# Split data, fusion and pruning\n\nTwo replicas trained at once (`train_replicas` "
        "picks the strategy: one vmapped program on a GPU, one replica after the other on "
        "a CPU) on disjoint halves of the data, fused with OTFusion, then pruned with "
        "Intra-Fusion: the paper's Prune-and-Fuse / Fuse-and-Prune building blocks. The "
        "full pipelines are `ifjax fap` and `ifjax paf`.",
    ),
    SETUP,
    (
        "code",
        "from train import split\n\n"
        "halves = [split.IndexedDataset(train_set, part)\n"
        "          for part in split.split_indices(len(train_set), 2, seed=0)]\n"
        "model = vgg11_bn(width_multiplier=0.125)\n"
        "inits = [model.init(jax.random.key(r), x) for r in range(2)]\n"
        "replicas, _ = split.train_replicas(model, inits, halves, epochs=3, batch_size=128,\n"
        "                                   optimizer_kind='fast', log=None)\n"
        "top1 = lambda v: training.evaluate(model, v, test_batches())['top1']\n"
        "for r, v in enumerate(replicas):\n"
        "    print(f'replica {r}: top-1 {top1(v):.2%}')",
    ),
    (
        "md",
        "Averaging the weights directly mixes unrelated channels; aligning the channels by "
        "optimal transport on their activations first (OTFusion, 200 samples) does not.",
    ),
    (
        "code",
        "samples = data.normalize(train_set.images[:200])\n"
        "fused = ifjax.fuse(model, replicas, inputs=samples, example_input=x)\n"
        "averaged = ifjax.average_variables(replicas)\n"
        "for name, v in (('plain average', averaged), ('OTFusion', fused)):\n"
        "    print(f'{name:>13}: top-1 {top1(v):.2%}')",
    ),
    ("md", "One epoch of fine-tuning on all the data, then Intra-Fusion on every group:"),
    (
        "code",
        "steps = data.steps_per_epoch(len(train_set), 128, drop_remainder=True)\n"
        "train_batches = lambda epoch, start: data.batches(\n"
        "    train_set, 128, shuffle=True, augment=True, epoch=epoch,\n"
        "    drop_remainder=True, start_step=start)\n"
        "fused, _ = training.fit(model, fused, train_batches=train_batches,\n"
        "                        eval_batches=test_batches, epochs=1, steps_per_epoch=steps,\n"
        "                        optimizer_kind='finetune', progress_bar=False)\n"
        "for method in ('default', 'intra_fusion'):\n"
        "    pm, pv, _ = ifjax.prune(model, fused, 'all', sparsity=0.4, method=method,\n"
        "                            example_input=x)\n"
        "    top1 = training.evaluate(pm, pv, test_batches())['top1']\n"
        "    print(f'{method:>12}, all groups at 40%: top-1 {top1:.2%}')",
    ),
]

NNX_MODEL = [
    (
        "md",
        "# Your own NNX model\n\nA CNN written the way the NNX docs write one (BatchNorm, "
        "Dropout, a flatten into `nnx.Linear`), trained briefly on CIFAR-10, pruned at 50% on "
        "every group with Default pruning and with Intra-Fusion, then fine-tuned with "
        "`nnx.Optimizer` like the original. ifjax gets nothing but the module.",
    ),
    (
        "code",
        "from functools import partial\n\nimport jax\nimport jax.numpy as jnp\n"
        "import optax\nfrom flax import nnx\n\nimport ifjax\nfrom train import data\n\n"
        "train_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'train'), 10_000)\n"
        "test_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'test'), 2_000)\n"
        "test_images = jnp.asarray(data.normalize(test_set.images))\n"
        "test_labels = jnp.asarray(test_set.labels)",
    ),
    (
        "code",
        "class CNN(nnx.Module):\n"
        "    def __init__(self, *, rngs: nnx.Rngs):\n"
        "        self.conv1 = nnx.Conv(3, 32, kernel_size=(3, 3), rngs=rngs)\n"
        "        self.bn1 = nnx.BatchNorm(32, rngs=rngs)\n"
        "        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)\n"
        "        self.bn2 = nnx.BatchNorm(64, rngs=rngs)\n"
        "        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))\n"
        "        self.linear1 = nnx.Linear(8 * 8 * 64, 128, rngs=rngs)\n"
        "        self.dropout = nnx.Dropout(rate=0.2, rngs=rngs)\n"
        "        self.linear2 = nnx.Linear(128, 10, rngs=rngs)\n\n"
        "    def __call__(self, x):\n"
        "        x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))\n"
        "        x = self.avg_pool(nnx.relu(self.bn2(self.conv2(x))))\n"
        "        x = x.reshape(x.shape[0], -1)\n"
        "        return self.linear2(self.dropout(nnx.relu(self.linear1(x))))\n\n\n"
        "@nnx.jit\n"
        "def train_step(model, optimizer, images, labels):\n"
        "    def loss_fn(model):\n"
        "        logits = model(images)\n"
        "        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()\n\n"
        "    loss, grads = nnx.value_and_grad(loss_fn)(model)\n"
        "    optimizer.update(model, grads)\n"
        "    return loss\n\n\n"
        "@nnx.jit\n"
        "def accuracy(model, images, labels):\n"
        "    return jnp.mean(jnp.argmax(model(images), -1) == labels)\n\n\n"
        "def fit(model, epochs, learning_rate):\n"
        "    model.train()\n"
        "    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)\n"
        "    for epoch in range(epochs):\n"
        "        for batch in data.batches(train_set, 128, shuffle=True, augment=True,\n"
        "                                  epoch=epoch, drop_remainder=True):\n"
        "            train_step(model, optimizer, batch['image'], batch['label'])\n"
        "    model.eval()\n"
        "    return float(accuracy(model, test_images, test_labels))\n\n\n"
        "model = CNN(rngs=nnx.Rngs(0))\n"
        "base = fit(model, epochs=3, learning_rate=1e-3)\n"
        "print(f'base model: {base:.2%} top-1')",
    ),
    (
        "md",
        "## Prune\n\nThe module is in evaluation mode (`fit` ends with `model.eval()`), which "
        "ifjax needs to trace it. `prune` returns a new module; `model` is untouched.",
    ),
    (
        "code",
        "x = test_images[:1]\n"
        "for group in ifjax.discover_groups(model, x):\n"
        "    print(group.describe())\n\n"
        "pruned = {}\n"
        "for method in ('default', 'intra_fusion'):\n"
        "    small, plans = ifjax.prune(\n"
        "        model, 'all', sparsity=0.5, method=method, example_input=x)\n"
        "    pruned[method] = small\n"
        "    top1 = float(accuracy(small, test_images, test_labels))\n"
        "    print(f'{method:>12}: {top1:.2%} top-1 before fine-tuning')\n\n"
        "count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))\n"
        "print(f'parameters: {count(model):,} -> {count(small):,}; '\n"
        "      f'conv2 now has {small.conv2.out_features} filters, linear1 reads '\n"
        "      f'{small.linear1.in_features} features')",
    ),
    ("md", "## Fine-tune the pruned models with `nnx.Optimizer`, one epoch each"),
    (
        "code",
        "for method, small in pruned.items():\n"
        "    top1 = fit(small, epochs=1, learning_rate=5e-4)\n"
        "    print(f'{method:>12}: {top1:.2%} top-1 after one epoch (base {base:.2%})')",
    ),
]

VIT_HEADS = [
    (
        "md",
        "# Intra-Fusion on a Vision Transformer: MLP neurons and attention heads\n\n"
        "A small ViT trained for a minute on (a slice of) the offline CIFAR-10; its groups "
        "(MLP neurons, attention heads, the residual stream), each pruned with Default "
        "pruning and with Intra-Fusion; how heads merge; and an NNX ViT written as users "
        "write them, pruned to a smaller module. The measured full-size story is "
        "`reports/datafree_vit.md`.",
    ),
    (
        "code",
        "import jax\nimport jax.numpy as jnp\nimport numpy as np\nfrom flax import nnx\n\n"
        "import ifjax\nfrom models.vit import ViT\nfrom train import data, training\n\n"
        "train_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'train'), 10_000)\n"
        "test_set = data.random_subset(data.load_dataset('cifar10_jpeg', 'test'), 2_000)\n"
        "test_batches = lambda: data.batches(test_set, 500, shuffle=False, augment=False)",
    ),
    (
        "md",
        "## Train a small ViT\n\nTwo blocks of width 64, 4 heads of 16, MLP 128; AdamW, "
        "three epochs of the warmup-cosine recipe, through the same `training.fit` as the "
        "CNNs.",
    ),
    (
        "code",
        "model = ViT(embed_dim=64, heads=(4, 4), head_dim=16, mlp_dims=(128, 128))\n"
        "variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))\n"
        "steps = data.steps_per_epoch(len(train_set.labels), 128, drop_remainder=True)\n"
        "train_batches = lambda epoch, start: data.batches(\n"
        "    train_set, 128, shuffle=True, augment=True, epoch=epoch, drop_remainder=True,\n"
        "    start_step=start)\n"
        "variables, _ = training.fit(\n"
        "    model, variables, train_batches=train_batches, eval_batches=test_batches,\n"
        "    epochs=3, steps_per_epoch=steps, optimizer_kind='fast', optimizer='adamw',\n"
        "    peak_lr=2e-3, weight_decay=0.05, progress_bar=False, log_every=None)\n"
        "evaluate = lambda m, v: training.evaluate(m, v, test_batches())['top1']\n"
        "base = evaluate(model, variables)\n"
        "print(f'base top-1: {base:.2%}')",
    ),
    (
        "md",
        "## Groups\n\nEvery group says its kind and layer. The residual stream is "
        "normalized by LayerNorm, so `prune(..., 'all')` leaves it out.",
    ),
    (
        "code",
        "x = jnp.zeros((1, 32, 32, 3))\n"
        "groups = ifjax.discover_groups(model, variables, x)\n"
        "for g in groups:\n    print(g.index, g.kind, g.layer or '(model)', g.size)",
    ),
    (
        "md",
        "## One layer at a time, both ways\n\nBoth methods keep the same heads (or "
        "neurons); Intra-Fusion merges the others into them by optimal transport.",
    ),
    (
        "code",
        "for g in groups:\n"
        "    if g.kind == 'residual':\n        continue\n"
        "    row = []\n"
        "    for method in ('default', 'intra_fusion'):\n"
        "        small, pruned, _ = ifjax.prune(\n"
        "            model, variables, g, sparsity=0.5, method=method, example_input=x)\n"
        "        row.append(evaluate(small, pruned))\n"
        "    print(f'{g.kind:>8} of {g.layer:<16} 50%: Default {row[0]:.2%}, '\n"
        "          f'Intra-Fusion {row[1]:.2%} ({100 * (row[1] - row[0]):+.1f})')",
    ),
    ("md", "## Every head group, and every MLP group, at once"),
    (
        "code",
        "for kind in ('heads', 'neurons'):\n"
        "    for sparsity in (0.25, 0.5):\n"
        "        row = []\n"
        "        for method in ('default', 'intra_fusion'):\n"
        "            small, pruned, _ = ifjax.prune(model, variables, kind, sparsity=sparsity,\n"
        "                                           method=method, example_input=x)\n"
        "            row.append(evaluate(small, pruned))\n"
        "        print(f'all {kind:>7} at {sparsity:.0%}: Default {row[0]:.2%}, '\n"
        "              f'Intra-Fusion {row[1]:.2%}; heads {small.heads}, MLP {small.mlp_dims}')",
    ),
    (
        "md",
        "## How heads merge\n\nA block with two heads that compute the same thing (equal "
        "query, key and value weights), writing through different output projections. "
        "Pruning it to one head merges them: with `head_merge='average'` (the default) "
        "the kept head takes the mean of their query, key and value weights and the sum "
        "of their output projections, so the model computes exactly what it did. "
        "`'values'` keeps the kept head's query and key and merges values and outputs "
        "only (exact here too); `'map'` sums queries and keys as the reference sums "
        "channels, which scales the attention logits by four.",
    ),
    (
        "code",
        "pair = ViT(embed_dim=32, heads=(2,), head_dim=16, mlp_dims=(64,))\n"
        "pair_vars = pair.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))\n"
        "att = pair_vars['params']['block0']['attention']\n"
        "for name in ('query', 'key', 'value'):\n"
        "    k, b = att[name]['kernel'], att[name]['bias']\n"
        "    att[name] = {'kernel': k.at[:, 1].set(k[:, 0]), 'bias': b.at[1].set(b[0])}\n"
        "heads = next(g for g in ifjax.discover_groups(pair, pair_vars, x) if g.kind == 'heads')\n"
        "images = next(test_batches())['image'][:64]\n"
        "dense = pair.apply(pair_vars, images)\n"
        "for rule in ifjax.HEAD_MERGES:\n"
        "    small, pruned, plans = ifjax.prune(pair, pair_vars, heads, widths={heads.index: 1},\n"
        "                                       example_input=x, head_merge=rule)\n"
        "    change = float(jnp.abs(small.apply(pruned, images) - dense).max())\n"
        "    print(f'{rule:>8}: writer map {np.asarray(plans[0].writer_map).round(2).tolist()}, '\n"
        "          f'largest change of a logit {change:.1e}')",
    ),
    (
        "md",
        "## An NNX ViT, as users write it\n\n`nnx.MultiHeadAttention` and `nnx.Linear`; "
        "pruned into a new, smaller module (the input is untouched) that runs and trains.",
    ),
    (
        "code",
        "class Block(nnx.Module):\n"
        "    def __init__(self, dim, heads, hidden, *, rngs):\n"
        "        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)\n"
        "        self.attention = nnx.MultiHeadAttention(\n"
        "            num_heads=heads, in_features=dim, decode=False, rngs=rngs)\n"
        "        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)\n"
        "        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)\n"
        "        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)\n\n"
        "    def __call__(self, x):\n"
        "        x = x + self.attention(self.norm1(x))\n"
        "        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))\n\n\n"
        "class TinyViT(nnx.Module):\n"
        "    def __init__(self, dim=32, depth=2, heads=4, hidden=64, *, rngs):\n"
        "        self.embed = nnx.Conv(3, dim, (8, 8), strides=(8, 8), rngs=rngs)\n"
        "        self.cls = nnx.Param(jnp.zeros((1, 1, dim)))\n"
        "        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 17, dim)))\n"
        "        self.blocks = nnx.List("
        "[Block(dim, heads, hidden, rngs=rngs) for _ in range(depth)])\n"
        "        self.norm = nnx.LayerNorm(dim, rngs=rngs)\n"
        "        self.head = nnx.Linear(dim, 10, rngs=rngs)\n\n"
        "    def __call__(self, x):\n"
        "        x = self.embed(x)\n"
        "        x = x.reshape(x.shape[0], -1, x.shape[-1])\n"
        "        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))\n"
        "        x = jnp.concatenate([cls, x], axis=1) + self.pos[...]\n"
        "        for block in self.blocks:\n"
        "            x = block(x)\n"
        "        return self.head(self.norm(x)[:, 0])\n\n\n"
        "module = TinyViT(rngs=nnx.Rngs(0))\n"
        "module.eval()\n"
        "small_module, plans = ifjax.prune(module, 'all', sparsity=0.5, example_input=images)\n"
        "count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))\n"
        "print('heads:', [b.attention.num_heads for b in small_module.blocks],\n"
        "      '| parameters:', count(module), '->', count(small_module))\n"
        "print('logits:', small_module(images).shape)",
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


NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "datafree_sweep.ipynb": DATAFREE,
    "split_fusion.ipynb": SPLIT_FUSION,
    "nnx_model.ipynb": NNX_MODEL,
    "vit_heads.ipynb": VIT_HEADS,
}


def main() -> None:
    """Writes every notebook (or those named, e.g. ``vit_heads.ipynb``); with
    ``--execute`` runs it and keeps the outputs."""
    import sys

    execute = "--execute" in sys.argv
    names = [a for a in sys.argv[1:] if a.endswith(".ipynb")] or list(NOTEBOOKS)
    for name, cells in NOTEBOOKS.items():
        if name not in names:
            continue
        nb = notebook(cells)
        if execute:
            from nbclient import NotebookClient

            NotebookClient(nb, timeout=1800, kernel_name="python3").execute()
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
