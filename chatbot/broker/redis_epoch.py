"""The epoch of the Redis dataset: noticing that Redis lost data, and saying so.

Seqs are only meaningful within one dataset. A Redis that restarts empty, is restored from an
older snapshot or fails over to a lagging replica holds session logs whose seqs clients have
already seen other events under; written on, it would reuse them (clients drop those as
duplicates: a hole) or start at 1 again. So the dataset carries an epoch (Centrifugo calls the
same thing a stream's epoch), in one hash, `chatbot:epoch`:

    id      a random id, made by the first instance that finds none (an empty dataset)
    clock   a counter every batch of calls increments (its last command)

Each instance remembers the epoch and the highest clock it has seen. Before the first batch on
every new connection (a Redis restart or failover always means new connections) it runs the guard
below, which keeps the epoch when the data is at least as new as what this instance saw, and
otherwise begins a new one: no id (Redis came back empty), or a clock lower than one this instance
saw (older data). A changed epoch fails that batch (`EpochChanged`: nothing in it ran under the
old view), and the broker tells its sockets (they resync from the log or hear `session_expired`)
and its replies (they end `interrupted`). A Redis that restarts with all its data (an append-only
file with `appendfsync always`) keeps its epoch: nothing is lost, and nobody is disturbed.

Older data under connections that stay open (a failover behind a proxy, `DEBUG RELOAD`) marks no
new connection, so the scripts that write events (append, finish) check the clock themselves and
write nothing when it is below the writer's (`RedisBroker._appended`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from ..errors import EpochChanged
from ..patches.redis import pack_command
from ..protocol import new_id

log = logging.getLogger(__name__)

KEY: Final = "chatbot:epoch"

# ARGV: the epoch this instance knows ('' for none yet), the highest clock it saw, a new id.
_GUARD: Final = """
local state = redis.call('HMGET', KEYS[1], 'id', 'clock')
local id, clock = state[1], tonumber(state[2]) or 0
if not id or (id == ARGV[1] and clock < tonumber(ARGV[2])) then
  id = ARGV[3]
  redis.call('HSET', KEYS[1], 'id', id)
end
return {id, clock}
"""

TICK: Final = pack_command(("HINCRBY", KEY, "clock", 1))


class Epoch:
    """This instance's view of the dataset's epoch. `on_change(epoch)` is called when a new one
    began after this instance knew another (not when it learns the first)."""

    def __init__(self, on_change: Callable[[str], None], key: str = KEY) -> None:
        self.id = ""
        self.clock = 0
        self.key = key  # the epoch's hash
        self._on_change = on_change

    def guard_argv(self) -> tuple[Any, ...]:
        return ("EVAL", _GUARD, 1, self.key, self.id, self.clock, new_id())

    def guarded(self, reply: Any) -> None:
        """Take the guard's reply; `EpochChanged` when the epoch is not the one known."""
        epoch, clock = str(reply[0]), int(reply[1])
        if epoch == self.id:
            self.clock = max(self.clock, clock)
            return
        old, self.id, self.clock = self.id, epoch, clock
        if not old:
            log.info("redis dataset epoch %s", epoch)
            return
        log.warning("redis lost data (epoch %s -> %s): sockets resync, replies end", old, epoch)
        self._on_change(epoch)
        raise EpochChanged(epoch)

    def ticked(self, reply: Any) -> None:
        """Take the reply of the `TICK` that ends each batch."""
        if isinstance(reply, int):
            self.clock = max(self.clock, reply)
