"""The `edge-spooler` command: run, send, status, check, dead-letters, quarantine."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common.cli import global_options, make_parser, run_command
from common.config import config_path, dump_effective
from common.link import probe
from common.envelope import format_time
from common.exits import Exit
from edge import operator as ops
from edge.config import EdgeConfig, load_edge_config
from edge.errors import RecordError, SpoolError
from edge.outbox import Outbox
from edge.records import parse_lines, parse_value
from edge.state import daemon_holding, pid_alive, read_state

PROG = "edge-spooler"
ENV = "SPOOLMQ_EDGE_CONFIG"


def load(args) -> EdgeConfig:
    return load_edge_config(config_path(args.config, ENV))


def cmd_run(args) -> int:
    from edge.spooler import Spooler

    Spooler(load(args)).run()
    return Exit.OK


def cmd_send(args) -> int:
    from edge.api import Producer

    cfg = load(args)
    data = _read_input(args)
    what = args.file or ("--data" if args.data is not None else "stdin")
    payloads = parse_lines(data, what) if args.lines else [parse_value(data, what)]
    with Producer(cfg) as producer:
        ids = producer.send_json(args.stream, payloads)
    sys.stdout.write("".join(f"{i}\n" for i in ids))
    return Exit.OK


def _read_input(args) -> bytes:
    if args.data is not None:
        return args.data.encode("utf-8", "surrogateescape")
    if args.file and args.file != "-":
        try:
            with open(args.file, "rb") as f:
                return f.read()
        except OSError as exc:
            raise RecordError(f"cannot read {args.file}: {exc.strerror}",
                              exit_code=Exit.IOERR if not isinstance(
                                  exc, FileNotFoundError) else Exit.DATAERR)
    return sys.stdin.buffer.read()


def cmd_status(args) -> int:
    cfg = load(args)
    if not Path(cfg.outbox.path).exists():
        raise SpoolError(
            f"outbox {cfg.outbox.path} does not exist yet: start the daemon "
            "(edge-spooler run) or accept a record (edge-spooler send)",
            exit_code=Exit.TEMPFAIL)
    outbox = Outbox(cfg.outbox.path, cfg.edge_id, create=False)
    try:
        summary = outbox.summary()
    finally:
        outbox.close()
    state = read_state(cfg.outbox.status_path) or {}
    holder = daemon_holding(cfg.outbox.path + ".lock")
    report = _status_report(cfg, summary, state, holder)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return Exit.OK if report["healthy"] else Exit.TEMPFAIL


def _status_report(
    cfg: EdgeConfig, summary: dict, state: dict, holder: int | None = None
) -> dict:
    current = pid_alive(state.get("pid"))  # the state file is the daemon's own
    running = current or holder is not None
    connected = current and bool(state.get("connected"))
    oldest = summary["oldest_accepted_at"]
    age = state.get("oldest_unconfirmed_age_s") if current else None
    problems = []
    if not running:
        problems.append("daemon not running")
    elif not current:
        problems.append(
            f"the daemon (pid {holder or '?'}) cannot write its state file; "
            "is the disk full?"
        )
    elif not connected:
        problems.append("not connected to the broker")
    if age is not None and age > cfg.publish.degraded_after:
        problems.append(f"records unconfirmed for {age:.0f} s")
    return {
        "edge_id": cfg.edge_id,
        "epoch": state.get("epoch"),
        "broker": cfg.broker.address,
        "running": running,
        "connected": connected,
        "records_waiting": summary["records_waiting"],
        "bytes_waiting": summary["bytes_waiting"],
        "oldest_waiting_age_s": None if oldest is None else round(
            max(0.0, time.time() - oldest), 1),
        "unconfirmed": state.get("unconfirmed", 0) if running else 0,
        "oldest_unconfirmed_age_s": age,
        "last_receipt_at": state.get("last_receipt_at"),
        "dead_letters": summary["dead_letters"],
        "next_seq": summary["next_seq"],
        "healthy": not problems,
        "problems": problems,
    }


def _print_status(report: dict) -> None:
    receipt = report["last_receipt_at"]
    rows = [
        ("edge", report["edge_id"]),
        ("broker", f"{report['broker']} ("
         f"{'connected' if report['connected'] else 'not connected'})"),
        ("daemon", "running" if report["running"] else "not running"),
        ("records waiting", report["records_waiting"]),
        ("unconfirmed", report["unconfirmed"]),
        ("oldest waiting", _age(report["oldest_waiting_age_s"])),
        ("last receipt", time.strftime("%Y-%m-%d %H:%M:%S",
                                       time.localtime(receipt)) if receipt else "never"),
        ("dead letters", report["dead_letters"]),
        ("health", "ok" if report["healthy"] else "degraded: "
         + "; ".join(report["problems"])),
    ]
    for name, value in rows:
        print(f"{name:16} {value}")


def _age(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def cmd_check(args) -> int:
    cfg = load(args)
    sys.stdout.write(dump_effective(cfg))
    if args.connect:
        print(f"# {probe(cfg.broker, cfg.edge_id)}")
    return Exit.OK


def build_parser():
    common = global_options(ENV)
    parser = make_parser(PROG, "Store-and-forward spooler of a spoolmq edge host.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", parents=[common], help="run the daemon")
    p.set_defaults(handler=cmd_run)
    p = sub.add_parser("send", parents=[common],
                       help="accept records into the outbox; print their ids")
    p.add_argument("--stream", required=True, help="stream name of the records")
    p.add_argument("--lines", action="store_true",
                   help="one record per line (JSON Lines) instead of one value")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="JSON", help="the record as JSON text")
    src.add_argument("--file", metavar="PATH", help="read the input from a file")
    src.add_argument("-", dest="stdin", action="store_true",
                     help="read the input from standard input")
    p.set_defaults(handler=cmd_send)
    p = sub.add_parser("status", parents=[common],
                       help="show the outbox and the link; exit 75 when degraded")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_status)
    p = sub.add_parser("check", parents=[common],
                       help="validate the config and print the effective one")
    p.add_argument("--connect", action="store_true",
                   help="also connect to the broker once with these credentials "
                   "(exit 69 unreachable, 77 refused)")
    p.set_defaults(handler=cmd_check)
    _add_dead_letter_commands(sub, common)
    _add_quarantine_commands(sub, common)
    return parser


# --- dead letters and quarantine: the operator's tools (edge/operator.py) ----


def cmd_dead_letters_list(args) -> int:
    cfg = load(args)
    outbox = Outbox(cfg.outbox.path, cfg.edge_id, create=False)
    try:
        letters = ops.list_dead_letters(outbox)
    finally:
        outbox.close()
    if args.json:
        print(json.dumps([_dead_letter_json(cfg, d) for d in letters], indent=2))
        return Exit.OK
    if letters:
        print(
            f"{'ID':>6}  {'RECORD':27} {'STREAM':16} {'DEAD AT':24} "
            f"{'BYTES':>8}  REASON"
        )
    for d in letters:
        print(
            f"{d.id:>6}  {f'{d.epoch}:{d.seq}':27} {d.stream:16} "
            f"{format_time(d.dead_at):24} {d.payload_bytes:>8}  {d.reason}"
        )
    print(f"{len(letters)} dead letters")
    return Exit.OK


def _dead_letter_json(cfg: EdgeConfig, d) -> dict:
    return {
        "id": d.id,
        "record_id": f"{cfg.edge_id}:{d.epoch}:{d.seq}",
        "epoch": d.epoch,
        "seq": d.seq,
        "stream": d.stream,
        "reason": d.reason,
        "dead_at": format_time(d.dead_at),
        "payload_bytes": d.payload_bytes,
    }


def cmd_dead_letters_requeue(args) -> int:
    cfg = load(args)
    outbox = Outbox(cfg.outbox.path, cfg.edge_id, create=False)
    try:
        records, segments = ops.requeue_dead_letters(
            outbox,
            None if args.all else args.ids,
            segment_records=cfg.outbox.segment_records,
            segment_bytes=cfg.outbox.segment_bytes,
        )
    finally:
        outbox.close()
    print(
        f"requeued {records} dead letters into the outbox ({segments} "
        "segments), each under its original id"
    )
    return Exit.OK


def cmd_dead_letters_purge(args) -> int:
    cfg = load(args)
    outbox = Outbox(cfg.outbox.path, cfg.edge_id, create=False)
    try:
        count = ops.purge_dead_letters(outbox, None if args.all else args.ids)
    finally:
        outbox.close()
    print(f"purged {count} dead letters")
    return Exit.OK


def cmd_quarantine_list(args) -> int:
    items = ops.list_quarantined(load(args).spool)
    if args.json:
        print(json.dumps([_quarantined_json(q) for q in items], indent=2))
        return Exit.OK
    for q in items:
        print(
            f"{q.path}  ({q.spool.stream}, {q.size} bytes): "
            f"{q.reason or 'no reason file'}"
        )
    print(f"{len(items)} quarantined files")
    return Exit.OK


def _quarantined_json(q) -> dict:
    return {
        "name": q.name,
        "path": str(q.path),
        "dir": q.spool.dir,
        "stream": q.spool.stream,
        "bytes": q.size,
        "reason": q.reason,
    }


def cmd_quarantine_requeue(args) -> int:
    moved = ops.requeue_quarantined(_chosen_quarantined(args))
    for item, target in moved:
        print(f"{item.path} -> {target}")
    print(f"requeued {len(moved)} quarantined files")
    return Exit.OK


def cmd_quarantine_purge(args) -> int:
    count = ops.purge_quarantined(_chosen_quarantined(args))
    print(f"purged {count} quarantined files")
    return Exit.OK


def _chosen_quarantined(args) -> list:
    # argparse cannot make a '*' positional exclusive with an option.
    if args.all == bool(args.names):
        raise SpoolError(
            f"quarantine {args.action}: give --all or at least one NAME, not both; "
            f"see {PROG} quarantine {args.action} --help",
            exit_code=Exit.USAGE,
        )
    spools = load(args).spool
    if args.all:
        return ops.list_quarantined(spools)
    return ops.find_quarantined(spools, args.names)


def _add_dead_letter_commands(sub, common) -> None:
    group = sub.add_parser(
        "dead-letters",
        help="list, requeue or purge the records no broker carried",
        description="Records no broker would carry wait in the outbox's "
        "dead_letters table; the core was told they were skipped.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "list",
        parents=[common],
        help="list dead letters: id, record, stream, reason, size",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array, one object per dead letter",
    )
    p.set_defaults(handler=cmd_dead_letters_list)
    for name, handler, text in (
        (
            "requeue",
            cmd_dead_letters_requeue,
            "put dead letters back into the outbox under their original ids",
        ),
        ("purge", cmd_dead_letters_purge, "delete dead letters for good"),
    ):
        p = actions.add_parser(name, parents=[common], help=text)
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument(
            "--all", action="store_true", help=f"{name} every dead letter"
        )
        which.add_argument(
            "--id",
            dest="ids",
            type=int,
            nargs="+",
            action="extend",
            metavar="N",
            help=f"{name} the dead letters with these "
            "ids (as list shows them); exit 65 if one is unknown",
        )
        p.set_defaults(handler=handler)


def _add_quarantine_commands(sub, common) -> None:
    group = sub.add_parser(
        "quarantine",
        help="list, requeue or purge the spool files put in .failed/",
        description="Spool files the daemon could not take wait in "
        "DIR/.failed/, each with NAME.reason beside it.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "list",
        parents=[common],
        help="list quarantined files with their size and reason",
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON array, one object per file"
    )
    p.set_defaults(handler=cmd_quarantine_list)
    for name, handler, text in (
        (
            "requeue",
            cmd_quarantine_requeue,
            "move files back into their spool dir, never over a producer's file",
        ),
        ("purge", cmd_quarantine_purge, "delete files and their reasons for good"),
    ):
        p = actions.add_parser(name, parents=[common], help=text)
        p.add_argument(
            "--all", action="store_true", help=f"{name} every quarantined file"
        )
        p.add_argument(
            "names",
            nargs="*",
            metavar="NAME",
            help=f"{name} these files, by name or path (as list shows "
            "them); exit 65 if one is unknown",
        )
        p.set_defaults(handler=handler)

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
