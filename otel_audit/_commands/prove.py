"""``otel-audit prove``: check a salted commitment in a record against a value.

Exit 0 when the record's attribute commits to the value, 1 when it does not,
2 when the record or attribute does not exist or holds no commitment.
"""

from __future__ import annotations

import argparse

from otel_audit._commands._common import add_ledger_argument, open_for_reading
from otel_audit.errors import ConfigError, VerificationError
from otel_audit.policy.redact import check_commitment
from otel_audit.proof.chain import link_hash


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "prove", help="check that a record's committed attribute equals a value (exit 0 yes, 1 no)"
    )
    add_ledger_argument(p)
    p.add_argument("--seq", type=int, required=True, metavar="N", help="record sequence number")
    p.add_argument("--chain", metavar="C", help="chain id (needed when the ledger has several)")
    p.add_argument("--attribute", required=True, metavar="NAME", help="attribute name")
    p.add_argument("--value", required=True, metavar="V", help="the value shown to the reviewer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_for_reading(args) as ledger:
        chain = args.chain
        if chain is None:
            chains = ledger.chains()
            if len(chains) != 1:
                raise ConfigError(
                    f"the ledger has {len(chains)} chains ({', '.join(chains) or 'none'}); pass --chain"
                )
            chain = chains[0]
        row = next(iter(ledger.scan(chain, after_seq=args.seq - 1)), None) if args.seq > 0 else None
        if row is None or row.seq != args.seq:
            raise ConfigError(f"chain {chain!r} has no record {args.seq}")
    # The proof is only worth the record it rests on: check its own link.
    if link_hash(row.prev_hash, row.body) != row.hash:
        raise VerificationError(
            f"record {chain}:{row.seq} does not match its hash; run otel-audit verify",
            chain=chain,
            seq=row.seq,
            kind="hash",
        )
    from otel_audit.engine.record import decode

    try:
        record = decode(row.body)
    except ValueError as exc:
        raise VerificationError(f"record {chain}:{row.seq} cannot be decoded: {exc}") from None
    if args.attribute not in record.attributes:
        raise ConfigError(f"record {chain}:{row.seq} has no attribute {args.attribute!r}")
    stored = record.attributes[args.attribute]
    values = stored if isinstance(stored, list) else [stored]
    try:
        matched = any(check_commitment(item, args.value) for item in values)
    except ValueError as exc:
        raise ConfigError(
            f"attribute {args.attribute!r} of record {chain}:{row.seq}: {exc}"
        ) from None
    if matched:
        print(f"match: {args.attribute} of record {chain}:{row.seq} commits to the given value")
        print("(the record's own hash link holds; run otel-audit verify for the whole chain)")
        return 0
    print(
        f"no match: {args.attribute} of record {chain}:{row.seq} does not commit to the given value"
    )
    return 1
