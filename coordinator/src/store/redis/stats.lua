-- Counts the farm in one consistent read: the store's `farm_counts`, mirrored
-- by the memory store. Writes nothing.
-- Returns JSON: {"models": {NAME: [queued, running, workers]},
--                "jobs": {STATE: n}, "workers": {STATE: n}}.
-- A worker's state is `policy::worker_state` in Rust; a model's workers are
-- the live ones taking work (idle or busy) that announce it.
local models, jobs, workers = {}, {}, {}
local function load(name)
  local m = models[name]
  if not m then
    m = {0, 0, 0}
    models[name] = m
  end
  return m
end
for _, name in ipairs(redis.call('HKEYS', k('models'))) do load(name) end
for _, job in ipairs(redis.call('ZRANGE', k('jobs'), 0, -1)) do
  local state = redis.call('HGET', k('job', job), 'state')
  if state then
    jobs[state] = (jobs[state] or 0) + 1
    if state == JOB_RUNNING then
      for _, model in ipairs(redis.call('SMEMBERS', k('job', job, 'models'))) do
        local m = load(model)
        m[1] = m[1] + redis.call('ZCARD', k('q', job, model))
      end
      for _, tid in ipairs(redis.call('SMEMBERS', k('job', job, 'waiting'))) do
        local model = redis.call('HGET', k('task', tid), 'model')
        if model then
          local m = load(model)
          m[1] = m[1] + 1
        end
      end
      for _, tid in ipairs(redis.call('SMEMBERS', k('job', job, 'leased'))) do
        local model = redis.call('HGET', k('task', tid), 'model')
        if model then
          local m = load(model)
          m[2] = m[2] + 1
        end
      end
    end
  end
end
for _, w in ipairs(redis.call('SMEMBERS', k('workers'))) do
  local f = redis.call('HMGET', k('worker', w), 'draining', 'seen', 'models')
  local state = WORKER_IDLE
  if not alive_since(f[2]) then
    state = WORKER_LOST
  elseif f[1] == '1' then
    state = WORKER_DRAINING
  elseif redis.call('SCARD', k('worker', w, 'running')) > 0 then
    state = WORKER_BUSY
  end
  workers[state] = (workers[state] or 0) + 1
  if (state == WORKER_IDLE or state == WORKER_BUSY) and f[3] then
    for name, _ in pairs(cjson.decode(f[3])) do
      local m = load(name)
      m[3] = m[3] + 1
    end
  end
end
-- cjson writes an empty table as {}: an object, as the reader expects.
return cjson.encode({models = models, jobs = jobs, workers = workers})
