"""The QMP commands, with QEMU 7.2's names, arguments and reply shapes (qapi/migration.json,
qapi/run-state.json), so that existing clients (libvirt, qemu.qmp) drive mignet unchanged.

Handlers run on the main loop with the big lock held (see server.py) and must return at
once: anything slow happens in a migration thread or, for ``x-mignet-query-guest``, in a
worker thread awaited without the lock. Argument checking words its errors like QEMU's QAPI
input visitor ("Parameter 'uri' is missing", "Invalid parameter type for 'uri', expected:
string"), so scripts that match on them keep working.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mignet import __version__
from mignet.control.migrations import Migrations, postcopy_host_check
from mignet.control.options import OptionSet, parse_capabilities
from mignet.control.qmp_server import QEMU_VERSION, Handler, QmpError
from mignet.errors import RequestRefused
from mignet.migration.status import MigrationState, query_migrate
from mignet.runtime.bql import BQL
from mignet.runtime.mainloop import current_main_loop, record_bql_holds, summarize

_TYPES: dict[type, str] = {str: "string", bool: "boolean", int: "integer", dict: "object", list: "array"}


def check_args(args: dict[str, Any], required: dict[str, type] | None = None,
               optional: dict[str, type] | None = None) -> None:
    """QAPI-style argument checking: unexpected, missing and mistyped members."""
    required, optional = required or {}, optional or {}
    for key in args:
        if key not in required and key not in optional:
            raise QmpError("GenericError", f"Parameter '{key}' is unexpected")
    for key in required:
        if key not in args:
            raise QmpError("GenericError", f"Parameter '{key}' is missing")
    for key, value in args.items():
        want = required.get(key) or optional[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise QmpError("GenericError",
                           f"Invalid parameter type for '{key}', expected: {_TYPES[want]}")


class Commands:
    """Binds the command names to this process's migrations, options and state."""

    def __init__(self, migrations: Migrations, options: OptionSet, state: MigrationState,
                 on_quit: Callable[[], None]) -> None:
        self.migrations = migrations
        self.options = options
        self.state = state
        self.on_quit = on_quit

    def table(self) -> dict[str, Handler]:
        return {
            "migrate": self.migrate,
            "migrate-incoming": self.migrate_incoming,
            "migrate-recover": self.migrate_recover,
            "migrate-start-postcopy": self.migrate_start_postcopy,
            "migrate-cancel": self.migrate_cancel,
            "migrate-set-capabilities": self.migrate_set_capabilities,
            "query-migrate-capabilities": self.query_migrate_capabilities,
            "migrate-set-parameters": self.migrate_set_parameters,
            "query-migrate-parameters": self.query_migrate_parameters,
            "query-migrate": self.query_migrate,
            "query-status": self.query_status,
            "cont": self.cont,
            "stop": self.stop,
            "query-version": self.query_version,
            "query-commands": self.query_commands,
            "quit": self.quit,
            "x-mignet-query-guest": self.query_guest,
            "x-mignet-loop-stats": self.loop_stats,
            "x-mignet-query-multifd": self.query_multifd,
            "object-add": self.object_add,
            "object-del": self.object_del,
        }

    # --- migration ---------------------------------------------------------------------
    def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        # blk/inc/detach/resume exist in QEMU 7.2's schema; only their defaults make sense here.
        check_args(args, {"uri": str}, {"blk": bool, "inc": bool, "detach": bool, "resume": bool,
                                        "config": dict})
        for flag in ("blk", "inc", "resume"):
            if args.get(flag):
                raise QmpError("GenericError", f"Parameter '{flag}' is not supported by mignet")
        self.migrations.start_outgoing(args["uri"], args.get("config"))
        return {}

    def migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args, {"uri": str}, {"config": dict})
        self.migrations.start_incoming(args["uri"], args.get("config"))
        return {}

    def migrate_recover(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args, {"uri": str})
        self.migrations.recover(args["uri"])
        return {}

    def migrate_start_postcopy(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's: the running outgoing migration switches to postcopy at its next sync."""
        check_args(args)
        self.migrations.start_postcopy()
        return {}

    def object_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's ``object-add`` for what a migration refers to: ``tls-creds-x509`` and
        ``authz-list`` (``migrate-set-parameters tls-creds/tls-authz`` name them by id)."""
        self.migrations.objects.add(args)
        return {}

    def object_del(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args, {"id": str})
        self.migrations.objects.delete(args["id"])
        return {}

    def migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args)
        self.migrations.cancel()
        return {}

    # --- options -----------------------------------------------------------------------
    def migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args, {"capabilities": list})
        caps = parse_capabilities(args["capabilities"])
        # As QEMU's migrate_caps_check: a destination checks that its host can fault on
        # missing pages when postcopy-ram is first turned on, not when the source switches.
        if caps.get("postcopy-ram") and not self.options.capability("postcopy-ram") \
                and self.state.runstate == "inmigrate":
            postcopy_host_check()
        self.options.set_capabilities(args["capabilities"])
        return {}

    def query_migrate_capabilities(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        check_args(args)
        return self.options.query_capabilities()

    def migrate_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        self.options.set_parameters(args)  # validates names, types and ranges itself
        return {}

    def query_migrate_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args)
        return self.options.query_parameters()

    # --- queries -----------------------------------------------------------------------
    def query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's MigrationInfo: times and ``ram`` while active and when completed,
        ``error-desc`` when failed, ``socket-address`` on a listening destination."""
        check_args(args)
        side = self.state.current()
        if side is None:
            return {}
        return query_migrate(side, int(self.options.parameter("downtime-limit")))

    def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args)
        runstate = self.state.runstate
        return {"status": runstate, "running": runstate == "running", "singlestep": False}

    def cont(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU 7.2's qmp_cont: while an incoming migration is pending it only sets
        autostart (the guest starts when the load completes); otherwise the guest runs."""
        check_args(args)
        if self.state.runstate == "inmigrate":
            self.state.autostart = True
        elif self.state.runstate == "finish-migrate":
            raise QmpError("GenericError", "The guest is being migrated: wait for the end")
        else:
            self.state.runstate = "running"
        return {}

    def stop(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU 7.2's qmp_stop: during a pending incoming migration it clears autostart,
        so the guest stays paused after the load (what management does before ``cont``)."""
        check_args(args)
        if self.state.runstate == "inmigrate":
            self.state.autostart = False
        elif self.state.runstate == "running":
            self.state.runstate = "paused"
        return {}

    def query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args)
        return {"qemu": dict(QEMU_VERSION), "package": f"mignet {__version__}"}

    def query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        check_args(args)
        return [{"name": n} for n in ["qmp_capabilities", *self.table()]]

    def quit(self, args: dict[str, Any]) -> dict[str, Any]:
        check_args(args)
        self.on_quit()
        return {}

    def query_multifd(self, args: dict[str, Any]) -> dict[str, Any]:
        """mignet's own: each multifd channel's pages and packets, for the latest migration in
        each direction (during it or after), beside query-migrate's ram.multifd-bytes total."""
        check_args(args)
        return self.migrations.multifd_channels()

    def loop_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """mignet's own: big-lock hold times and main-loop stalls since the last reset, the
        figures the receive-model benchmark reports. ``reset`` clears and starts recording;
        ``samples`` adds every recorded duration (seconds)."""
        check_args(args, optional={"reset": bool, "samples": bool})
        main = current_main_loop()
        if main is None:
            raise QmpError("GenericError", "this process does not run mignet's main loop")
        if args.get("reset"):
            record_bql_holds(True)
            main.record_stalls(True)
        holds, stalls = list(BQL.hold_times), list(main.selector.stalls)
        info: dict[str, Any] = {"bql-holds": summarize(holds), "main-loop-stalls": summarize(stalls),
                                "recv-model": self.migrations.guest.recv_model}
        if args.get("samples"):
            info["bql-hold-samples"] = holds
            info["stall-samples"] = stalls
        return info

    def query_guest(self, args: dict[str, Any]) -> Any:
        """mignet's own: digests of the guest's RAM (per block and overall, as
        GuestRam.digest) so tests and operators can check a migration end to end."""
        check_args(args)
        ram = self.migrations.guest.ram
        if ram is None:
            raise RequestRefused("this process holds no guest RAM yet")
        if self.state.incoming.running:
            raise RequestRefused("the guest's RAM is still arriving; query it after the migration")

        def digest() -> dict[str, Any]:
            blocks = [{"name": b.name, "size": b.size, "sha256": b.digest()} for b in ram]
            return {"ram-sha256": ram.digest(), "blocks": blocks,
                    "devices": len(self.migrations.guest.devices.devices)
                    + len(self.migrations.guest.devices.raw)}
        return asyncio.to_thread(digest)
