-- Reads the queued and leased tasks of running jobs by pinned (model, hash).
-- A job pins one hash per model at admission, so each (job, model) queue is
-- counted under its first task's hash. A read: it changes nothing.
-- Returns PIN_FIELDS values per row: model, hash, queued, running; one row
-- per (job, model) queue and one per leased task (Rust adds them up).
local out = {}
for _, job in ipairs(redis.call('ZRANGE', k('ready'), 0, -1)) do
  if redis.call('HGET', k('job', job), 'state') == JOB_RUNNING then
    for _, model in ipairs(redis.call('SMEMBERS', k('job', job, 'models'))) do
      local q = k('q', job, model)
      local first = redis.call('ZRANGE', q, 0, 0)[1]
      if first then
        local hash = redis.call('HGET', k('task', first), 'mhash') or ''
        for _, v in ipairs({model, hash, redis.call('ZCARD', q), 0}) do table.insert(out, v) end
      end
    end
  end
end
for _, tid in ipairs(redis.call('ZRANGE', k('leases'), 0, -1)) do
  local f = redis.call('HMGET', k('task', tid), 'state', 'model', 'mhash')
  if f[1] == TASK_LEASED then
    for _, v in ipairs({f[2], f[3] or '', 0, 1}) do table.insert(out, v) end
  end
end
return out
