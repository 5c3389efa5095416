-- Fails the queued tasks of running jobs pinned to (model, hash) when no live
-- worker holds the model under that hash (any hash when it is empty:
-- `ModelIdentity::is_held` in Rust): they would wait forever. The same transition as `MemoryStore::fail_unheld`.
-- Idempotent: a second run finds nothing queued to fail.
-- ARGV: 3 model, 4 hash, 5 message.
-- Returns {'held'}, or {'ok', tasks failed, then the id of every job this ended}.
local model, hash, msg = ARGV[3], ARGV[4], ARGV[5]
for _, w in ipairs(redis.call('SMEMBERS', k('workers'))) do
  if live(w) then
    local m = redis.call('HGET', k('worker', w), 'models')
    local h = m and cjson.decode(m)[model]
    if h ~= nil and (hash == '' or h == hash) then return {'held'} end
  end
end
local failed, finished = 0, {}
for _, job in ipairs(redis.call('ZRANGE', k('ready'), 0, -1)) do
  if redis.call('HGET', k('job', job), 'state') == JOB_RUNNING then
    local q = k('q', job, model)
    local any = false
    for _, tid in ipairs(redis.call('ZRANGE', q, 0, -1)) do
      local f = redis.call('HMGET', k('task', tid), 'mhash', 'index')
      if (f[1] or '') == hash then
        local index = tonumber(f[2])
        redis.call('ZREM', q, tid)
        redis.call('HSET', k('task', tid), 'state', TASK_FAILED)
        redis.call('HINCRBY', k('job', job), TASK_QUEUED, -1)
        redis.call('HINCRBY', k('job', job), TASK_FAILED, 1)
        event(job, EV_FAILED, tid, index, '', 0, FAULT_MODEL_UNAVAILABLE, msg)
        end_dependents(job, index, TASK_FAILED, EV_FAILED, 'its anchor failed')
        failed = failed + 1
        any = true
      end
    end
    if any and finish_if_done(job) ~= '' then table.insert(finished, job) end
  end
end
local out = {'ok', failed}
for _, job in ipairs(finished) do table.insert(out, job) end
return out
