-- Leases up to max queued tasks to a worker, in policy order: higher priority,
-- then older jobs, then item order; only models the worker holds (and the
-- pinned model hash); tasks it failed go to others while another live holder exists.
-- ARGV: 3 worker, 4 max, 5 lease ttl ms.
-- Returns {'unknown'}, {'drain'}, or {'ok', then 5 values per lease: task, job, index, epoch, recipe}.
local worker, max, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local wk = k('worker', worker)
if redis.call('EXISTS', wk) == 0 then return {'unknown'} end
redis.call('HSET', wk, 'seen', NOW)
if redis.call('HGET', wk, 'draining') == '1' then return {'drain'} end
local models = cjson.decode(redis.call('HGET', wk, 'models'))
local LIVE_MS = 60000

-- True when a live, non-draining worker other than `worker`, not in `avoid`, holds `model`.
local function someone_else_can(avoid, model)
  local skip = {}
  for _, w in ipairs(avoid) do skip[w] = true end
  for _, w in ipairs(redis.call('SMEMBERS', k('workers'))) do
    if w ~= worker and not skip[w] then
      local f = redis.call('HMGET', k('worker', w), 'draining', 'seen', 'models')
      if f[1] ~= '1' and f[2] and NOW - tonumber(f[2]) < LIVE_MS and f[3] then
        if cjson.decode(f[3])[model] ~= nil then return true end
      end
    end
  end
  return false
end

local out = {'ok'}
local taken = 0
for _, job in ipairs(redis.call('ZRANGE', k('ready'), 0, -1)) do
  if taken >= max then break end
  for _, model in ipairs(redis.call('SMEMBERS', k('job', job, 'models'))) do
    if taken >= max then break end
    local have = models[model]
    local q = k('q', job, model)
    if have ~= nil then
      -- Candidates: a few more than needed, to step over tasks this worker must avoid.
      local ids = redis.call('ZRANGE', q, 0, (max - taken) + 31)
      for _, tid in ipairs(ids) do
        if taken >= max then break end
        local t = k('task', tid)
        local f = redis.call('HMGET', t, 'mhash', 'avoid', 'index', 'epoch', 'recipe', 'attempts')
        local ok = f[1] == '' or f[1] == have
        if ok then
          local avoid = cjson.decode(f[2])
          for _, w in ipairs(avoid) do
            if w == worker and someone_else_can(avoid, model) then ok = false end
          end
        end
        if ok then
          local epoch = tonumber(f[4]) + 1
          local attempts = cjson.decode(f[6])
          table.insert(attempts, {worker = worker, epoch = epoch, started = NOW, outcome = 'running', fault = 0, message = ''})
          redis.call('HSET', t, 'state', 'leased', 'epoch', epoch, 'holder', worker, 'step', 0,
            'deadline', NOW + ttl, 'attempts', cjson.encode(attempts))
          redis.call('ZREM', q, tid)
          redis.call('ZADD', k('leases'), NOW + ttl, tid)
          redis.call('SADD', k('job', job, 'leased'), tid)
          redis.call('SADD', k('worker', worker, 'running'), tid)
          redis.call('HINCRBY', k('job', job), 'queued', -1)
          redis.call('HINCRBY', k('job', job), 'leased', 1)
          event(job, EV_LEASED, tid, tonumber(f[3]), worker, epoch, F_NONE, '')
          for _, v in ipairs({tid, job, f[3], epoch, f[5]}) do table.insert(out, v) end
          taken = taken + 1
        end
      end
    end
  end
  if tonumber(redis.call('HGET', k('job', job), 'queued')) == 0 then
    redis.call('ZREM', k('ready'), job)
  end
end
return out
