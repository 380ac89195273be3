"""Learners' answers that more than one test file submits."""

# A right LR finder whose sweep is built another way than the solution's (format `sweep` in):
# its learning rates differ from the reference's in the last bits, and it must still pass.
LR_FINDER_WITH_SWEEP = """\
def lr_finder(train_step, *, start_lr, end_lr, num_steps, diverge_factor):
    sweep = {sweep}
    lrs, losses, best = [], [], math.inf
    for lr in sweep:
        loss = train_step(float(lr))
        lrs.append(float(lr))
        losses.append(loss)
        if not math.isfinite(loss) or loss > diverge_factor * best:
            break
        best = min(best, loss)
    lowest = min((i for i in range(len(losses)) if math.isfinite(losses[i])), key=losses.__getitem__)
    return lrs, losses, lrs[lowest] / 10
"""
