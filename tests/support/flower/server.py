"""A Flower server for the federated-learning session test (issue 29): classic
``start_server`` with FedAvg for ``--rounds`` rounds and ``--min-clients`` clients; the
history is printed on stdout as JSON (the legacy reply) and written to ``--out``.  Flower's
own log goes to stderr, so stdout stays the one JSON document."""

import argparse
import json
import logging
import sys

import flwr as fl


def counted(metrics: list[tuple[int, dict]]) -> dict[str, int]:
    """Per round: how many clients took part and with how many examples."""
    return {"clients": len(metrics), "examples": sum(n for n, _ in metrics)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-clients", type=int, default=2)
    parser.add_argument("--address", default="127.0.0.1:8080")
    parser.add_argument("--out", default="/sandbox/history.json")
    args = parser.parse_args()
    for handler in logging.getLogger("flwr").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    n = args.min_clients
    strategy = fl.server.strategy.FedAvg(
        min_fit_clients=n, min_evaluate_clients=n, min_available_clients=n,
        fit_metrics_aggregation_fn=counted, evaluate_metrics_aggregation_fn=counted)
    history = fl.server.start_server(
        server_address=args.address, config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy)
    result = {"rounds": args.rounds,
              "losses_distributed": history.losses_distributed,
              "metrics_distributed_fit": history.metrics_distributed_fit,
              "metrics_distributed": history.metrics_distributed}
    with open(args.out, "w") as out:
        json.dump(result, out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
