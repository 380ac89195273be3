// Learning-rate schedules for the website's explorer (lesson 03).
// A line-by-line mirror of training.cosine_lr and training.linear_lr (same checks, same
// float64 arithmetic in the same order), so the curve a reader drags around on the website
// is the one the trainer uses; tests/test_schedule_js.py checks that they agree.

function checkSchedule(step, {maxLr, minLr, warmupSteps, totalSteps}) {
  for (const [name, value] of Object.entries({step, warmupSteps, totalSteps})) {
    if (!Number.isInteger(value) || value < 0) throw new RangeError(`${name} must be a non-negative integer, got ${value}`);
  }
  if (warmupSteps > totalSteps) throw new RangeError(`warmupSteps (${warmupSteps}) must not exceed totalSteps (${totalSteps})`);
  if (!(0 <= minLr && minLr <= maxLr)) throw new RangeError(`need 0 <= minLr <= maxLr, got minLr=${minLr}, maxLr=${maxLr}`);
}

/** Linear warmup to maxLr, half a cosine down to minLr at totalSteps, minLr after (training.cosine_lr). */
export function cosineLr(step, settings) {
  checkSchedule(step, settings);
  const {maxLr, minLr, warmupSteps, totalSteps} = settings;
  if (step < warmupSteps) return maxLr * step / warmupSteps;
  if (step >= totalSteps) return minLr;
  const progress = (step - warmupSteps) / (totalSteps - warmupSteps);
  return minLr + (maxLr - minLr) * 0.5 * (1.0 + Math.cos(Math.PI * progress));
}

/** Linear warmup to maxLr, a straight line down to minLr at totalSteps, minLr after (training.linear_lr). */
export function linearLr(step, settings) {
  checkSchedule(step, settings);
  const {maxLr, minLr, warmupSteps, totalSteps} = settings;
  if (step < warmupSteps) return maxLr * step / warmupSteps;
  if (step >= totalSteps) return minLr;
  const progress = (step - warmupSteps) / (totalSteps - warmupSteps);
  return maxLr + (minLr - maxLr) * progress;
}

/** The schedule at every step 0..totalSteps, as [{step, lr}] rows for Plot. */
export function scheduleCurve(schedule, settings) {
  return Array.from({length: settings.totalSteps + 1}, (_, step) => ({step, lr: schedule(step, settings)}));
}
