-- Creates a job and queues its tasks in one step, or returns the job its
-- idempotency key (or its id, on a retried call) already names.
-- ARGV: 3 job id, 4 project, 5 idempotency key, 6 name, 7 priority,
--       8 pin class (0/1), 9 class, 10 dedupe (0/1), 11 verify_of,
--       12 traceparent, 13 task count, then TASK_ARGS values per task (id, index, model, model hash,
--       recipe json, file name, steps, series, shot, depends_on (-1: none),
--       avoid json, batch key, needs json (policy::task_needs), recipe hash,
--       LoRA set key (policy::task_lora_set)), then a blob count and (sha, bytes) pairs,
--       then the webhook targets as a JSON array ('[]': none), then the submitting
--       token's name ('': unknown).
local job, project, idem, name, prio = ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
-- A retried call finds its own job: report it as created.
if redis.call('EXISTS', k('job', job)) == 1 then return {1, job} end
if idem ~= '' then
  local existing = redis.call('GET', k('idem', project, idem))
  if existing and redis.call('EXISTS', k('job', existing)) == 1 then return {0, existing} end
end
local n = tonumber(ARGV[13])
redis.call('HSET', k('job', job), 'id', job, 'name', name, 'project', project, 'priority', prio,
  'state', JOB_RUNNING, 'created', NOW, 'finished', 0, 'idem', idem, 'total', n, TASK_QUEUED, n,
  TASK_LEASED, 0, TASK_COMPLETED, 0, TASK_FAILED, 0, TASK_CANCELLED, 0, 'seq', 0,
  'pin', ARGV[8], 'class', ARGV[9], 'dedupe', ARGV[10], 'verify_of', ARGV[11], 'traceparent', ARGV[12],
  'served', 0)
redis.call('ZADD', k('jobs'), NOW, job)
if idem ~= '' then redis.call('SET', k('idem', project, idem), job) end
local at = 14
local shots = '0'
for _ = 1, n do
  local tid, index, model = ARGV[at], tonumber(ARGV[at + 1]), ARGV[at + 2]
  local depends = tonumber(ARGV[at + 9])
  redis.call('HSET', k('task', tid), 'id', tid, 'job', job, 'index', index, 'model', model,
    'mhash', ARGV[at + 3], 'recipe', ARGV[at + 4], 'file', ARGV[at + 5], 'steps', ARGV[at + 6],
    'series', ARGV[at + 7], 'shot', ARGV[at + 8], 'depends', depends, 'avoid', ARGV[at + 10],
    'bkey', ARGV[at + 11], 'needs', ARGV[at + 12], 'rhash', ARGV[at + 13], 'lset', ARGV[at + 14], 'init', '',
    'state', TASK_QUEUED, 'epoch', 0, 'step', 0, 'holder', '', 'deadline', 0,
    'attempts', '[]', 'result', '')
  redis.call('RPUSH', k('job', job, 'tasks'), tid)
  redis.call('SADD', k('job', job, 'models'), model)
  if depends >= 0 then
    -- A shot waits for its anchor: it is queued when the anchor is done.
    redis.call('RPUSH', k('job', job, 'waiting', depends), tid)
    redis.call('SADD', k('job', job, 'waiting'), tid)
    shots = '1'
  else
    redis.call('ZADD', k('q', job, model), index, tid)
  end
  at = at + TASK_ARGS
end
-- Whether any task waits for an anchor (prelude: may_have_shots).
redis.call('HSET', k('job', job), 'shots', shots)
local blobs = tonumber(ARGV[at])
at = at + 1
for _ = 1, blobs do
  redis.call('HSET', k('job', job, 'blobs'), ARGV[at], ARGV[at + 1])
  at = at + 2
end
-- The targets of the delivery that ending the job opens (prelude's open_delivery).
if ARGV[at] ~= '[]' then
  redis.call('HSET', k('job', job), 'notify', ARGV[at])
end
if ARGV[at + 1] ~= '' then
  redis.call('HSET', k('job', job), 'by', ARGV[at + 1])
end
redis.call('ZADD', k('ready'), -prio, job)
wake_workers()
return {1, job}
