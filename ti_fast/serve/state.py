"""ServerState: everything one server holds, made once and passed to the app factory.

Settings, home folder, job store, event hub, the worker. No module-level state: two servers in
one process are two ServerStates."""
from __future__ import annotations

import sys
import threading
import time

from ..errors import ConfigError
from . import jobs as J
from .events import Hub
from .home import Home
from .settings import ServeSettings
from .store import JobStore
from .worker import Worker


def real_group(process_cfg, say=print):
    """The training group of ti_fast.training (loads the model once)."""
    from ..training.group import TrainGroup
    return TrainGroup(process_cfg, say=say)


class ServerState:
    def __init__(self, settings: ServeSettings, *, group_factory=None, say=None):
        self.settings = settings
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.home = Home(settings.home)
        self.home.clean_tmp()
        self.store = JobStore(self.home.db_path)
        self.recovered = self.store.recover(J.resumable)
        self.hub = Hub()
        self.worker = Worker(settings=settings, home=self.home, store=self.store, hub=self.hub,
                             group_factory=group_factory or real_group, say=self.say)
        self.started = time.time()
        self.submit_lock = threading.Lock()     # checks and inserts of jobs, one request at a time
        self._stopped = False

    def start(self, timeout: float | None = None) -> None:
        """Start the worker and wait until the model is loaded; ConfigError (one line) when it
        could not be."""
        self.worker.start()
        if not self.worker.ready.wait(timeout):
            raise ConfigError(f"--model {self.settings.model}: still loading after {timeout:.0f} s")
        if self.worker.error:
            self.worker.join(5)
            raise ConfigError(self.worker.error)
        if self.recovered:
            self.say(f"ti-fast serve: {len(self.recovered)} job(s) from the last run queued again "
                     "(resuming from their last save)")

    @property
    def model_info(self):
        g = self.worker.group
        return getattr(getattr(g, "model", None), "info", None)

    def begin_shutdown(self) -> None:
        """First moment of a stop: event streams end, the worker interrupts the runs (they save)."""
        self.hub.close()
        self.worker.stop()

    def stop(self, timeout: float = 25.0) -> bool:
        """Stop everything; True when the worker finished saving within the timeout."""
        if self._stopped:
            return True
        self.begin_shutdown()
        done = self.worker.join(timeout)
        if not done:
            self.say(f"ti-fast serve: the worker did not stop within {timeout:.0f} s; runs keep their last save")
        self.store.close()
        self._stopped = True
        return done
