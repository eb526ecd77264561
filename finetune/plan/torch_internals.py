"""The one place that reaches into PyTorch's private members: its memory trackers (`MemTracker`,
`FSDPMemTracker` under torch.distributed._tools), subclassed to record one row of category bytes per op.

A PyTorch upgrade may rename or remove what is used here; `missing_private_members()` names what moved, and
tests/plan/test_torch_internals.py fails with that list.
"""
import importlib
import inspect

FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"  # the kinds of phase of a step

TRACKER_MODULES = {"MemTracker": "torch.distributed._tools.mem_tracker",
                   "FSDPMemTracker": "torch.distributed._tools.fsdp2_mem_tracker"}
# What recording_trackers() calls or overrides on MemTracker, with the parameters it passes or receives.
TRACKER_METHODS = {"_track_module_params_and_buffers": ("module", "install_grad_hooks"),
                   "_update_peak_stats": ("peak_state",), "_update_and_maybe_create_winfos": ("t", "reftype"),
                   "reset_mod_stats": (), "track_external": ()}
# What it reads on a MemTracker instance.
TRACKER_ATTRIBUTES = ("_curr_mem_snap", "_mod_tracker", "_ref_class", "_param_to_grad_hook_handles")


def missing_private_members() -> list[str]:
    """What recording_trackers() relies on that this PyTorch lacks, one entry per name; empty when all is there."""
    missing, classes = [], {}
    for name, module in TRACKER_MODULES.items():
        try:
            classes[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{name}")
    tracker = classes.get("MemTracker")
    if tracker is None:
        return missing
    if "FSDPMemTracker" in classes and not issubclass(classes["FSDPMemTracker"], tracker):
        missing.append("FSDPMemTracker as a subclass of MemTracker")
    for method, parameters in TRACKER_METHODS.items():
        found = getattr(tracker, method, None)
        if found is None:
            missing.append(f"MemTracker.{method}")
        elif not set(parameters) <= set(inspect.signature(found).parameters):
            missing.append(f"MemTracker.{method}({', '.join(parameters)})")
    instance = tracker()
    missing += [f"MemTracker().{name}" for name in TRACKER_ATTRIBUTES if not hasattr(instance, name)]
    if hasattr(instance, "_mod_tracker") and not hasattr(instance._mod_tracker, "parents"):
        missing.append("MemTracker()._mod_tracker.parents")
    if hasattr(instance, "_ref_class") and not hasattr(instance._ref_class, "GRAD"):
        missing.append("MemTracker()._ref_class.GRAD")
    return missing


def recording_trackers() -> tuple[type, type]:
    """MemTracker / FSDPMemTracker that record, after every op, the bytes held in each of their categories,
    labelled with the phase of the step and the execution position of the decoder layer running.

    PyTorch's trackers also keep per-module peak snapshots after every op; that is most of their time and
    unused here, so this replaces it with one row per op."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class TimelineRecorder:
        def start_timeline(self, layer_paths):
            """layer_paths: {module path of each decoder layer under the root: its index}."""
            self.categories = list(self._ref_class)
            self.layer_paths = layer_paths
            self.timeline, self.labels = [], []
            self.phase, self.kind, self.position, self.layer = -1, FORWARD, -1, None

        def enter_phase(self, kind):
            """The step's code marks its phases (FSDP's last gradient reduction, for one, runs after the
            tracker itself has left backward)."""
            self.phase, self.kind, self.position, self.layer = self.phase + 1, kind, -1, None
            if kind == FORWARD:
                self.reset_mod_stats()  # the trackers refuse a second forward of the root otherwise

        def _update_peak_stats(self, peak_state):
            layer = self._running_layer()
            if layer is not None and layer != self.layer:  # the next layer in execution order
                self.layer, self.position = layer, self.position + 1
            for snapshot in self._curr_mem_snap.values():  # one device: everything runs on the CPU here
                self.timeline.append([snapshot.get(category, 0) for category in self.categories])
                self.labels.append((self.phase, self.position))

        def _running_layer(self):
            # Module names look like "RootClass.model.layers.3". Where one layer hands over to the next, both
            # are open for a moment: take the newer one (forward runs up the layers, backward down).
            open_layers = [self.layer_paths.get(name.partition(".")[2]) for name in self._mod_tracker.parents]
            open_layers = [index for index in open_layers if index is not None]
            if not open_layers:
                return None
            return max(open_layers) if self.kind == FORWARD else min(open_layers)

        def category_names(self):
            return [category.value for category in self.categories]

    class SingleDeviceTracker(TimelineRecorder, MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # PyTorch's version hooks every parameter to label its gradient, which fails on frozen ones (a
            # LoRA base): label only the trainable ones.
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            for param in module.parameters() if install_grad_hooks else ():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._label_gradient),
                        param.register_post_accumulate_grad_hook(lambda p: self._label_gradient(p.grad)))
            return memory

        def _label_gradient(self, grad):
            self._update_and_maybe_create_winfos(grad, self._ref_class.GRAD)

    class ShardedTracker(TimelineRecorder, FSDPMemTracker):
        pass

    return SingleDeviceTracker, ShardedTracker
