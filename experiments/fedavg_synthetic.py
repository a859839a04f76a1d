"""FedAvg on FedProx Synthetic(1, 1) with multinomial logistic regression.

Run::

  python experiments/fedavg_synthetic.py            # 100 rounds
  python experiments/fedavg_synthetic.py --smoke    # a few seconds
"""

import argparse

import fedjax_lite as fl  # first: applies the fast CPU settings
import jax
import numpy as np
import optax
from tqdm import tqdm


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=100)
  ap.add_argument("--clients-per-round", type=int, default=10)
  ap.add_argument("--client-lr", type=float, default=0.01)
  ap.add_argument("--batch-size", type=int, default=10)
  ap.add_argument("--epochs", type=int, default=20)
  ap.add_argument("--eval-every", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args(argv)
  if args.smoke:
    args.rounds, args.epochs, args.eval_every = 5, 1, 5

  train, test = fl.datasets.fedprox_synthetic(1.0, 1.0, seed=args.seed)
  print(train, "\n", {k: v for k, v in train.summary().items()
                      if k != "examples_per_client"})
  model = fl.models.logistic_regression(60, 10)
  work = fl.LocalWork(batch_size=args.batch_size, num_epochs=args.epochs)
  engine = fl.Engine(fl.fed_avg(model, optax.sgd(args.client_lr)),
                     fl.RoundConfig(args.clients_per_round, work))
  data = engine.put_data(train)
  print("padding:", fl.data.padding_report(train.counts, work,
                                            data.bucket_sizes))
  state = engine.init(model.init(jax.random.PRNGKey(args.seed)),
                      seed=args.seed)
  bar = tqdm(range(1, args.rounds + 1), desc="fedavg", unit="round")
  for t in bar:
    state, m = engine.round(state, data)
    post = {"loss": f"{float(m['loss']):.4f}",
            "acc": f"{float(m['accuracy']):.3f}"}
    if t % args.eval_every == 0 or t == args.rounds:
      ev = fl.evaluate(model, state.server.params, test)
      post["test_acc"] = f"{ev.mean['accuracy']:.3f}"
      tqdm.write(f"round {t:4d}  train loss {float(m['loss']):.4f}  "
                 f"train acc {float(m['accuracy']):.3f}  "
                 f"test acc {ev.mean['accuracy']:.3f}  (per-client p10 "
                 f"{np.quantile(ev.per_client['accuracy'], 0.1):.3f})")
    bar.set_postfix(post)


if __name__ == "__main__":
  main()
