-- with: record_event
-- Take a job for a run: decide new / resumed / duplicate, count the attempt, install the new fencing token.
-- KEYS[1] state hash, KEYS[2] cancel key, KEYS[3] replay stream
-- ARGV[1] stream entry id, ARGV[2] fencing token, ARGV[3] worker id, ARGV[4] now (ms), ARGV[5] ttl (s),
-- ARGV[6] ms: taking over a run that started less than this long ago (Redis' clock) is not a failed attempt,
-- ARGV[7] the job's deadline (unix ms; '0': none), checked against Redis' clock, not the worker's: a worker host
-- whose clock is off must not refuse every job as late
-- Optional, to record and publish the run's `started` event here (as lua/publish.lua would, under the new token):
-- ARGV[8] the most attempts that still run, ARGV[9] / ARGV[10] the event JSON without its opening brace for a new
-- / a resumed run, ARGV[11] replay max length.
-- The event goes out in this same step: one round trip less before the first token, and the run's first publish
-- is its first token.
-- Statuses: states.JobStatus. Returns {'run' | 'duplicate', status or attempts, seq before this run, cancelled,
-- 1 when the started event was published (its seq is the returned seq + 1), ms past the deadline (0: not past)}.
local status = redis.call('HGET', KEYS[1], 'status')
local entry = redis.call('HGET', KEYS[1], 'entry')
if status == 'done' or status == 'failed' or status == 'cancelled' then
  if redis.call('EXISTS', KEYS[3]) == 1 then return {'duplicate', status, 0, 0} end
  -- finished long ago and its replay expired: nobody can read that outcome any more; this is a new job
  redis.call('DEL', KEYS[1])
  status = false
end
if status == 'running' and entry ~= ARGV[1] then
  return {'duplicate', status, 0, 0}
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local deadline = tonumber(ARGV[7] or '0') or 0
local late = 0
if deadline > 0 and now > deadline then late = now - deadline end
local increment = 1
if status == 'released' then increment = 0 end  -- handed back on shutdown: not a failed attempt ('retry' is)
-- Two workers claimed the entry at once (a Redis stall aged its idle time past the lease while the first one's
-- start waited): the run taken over had no chance to fail, so it costs no attempt.
if status == 'running' and now - tonumber(redis.call('HGET', KEYS[1], 'claimed_ms') or '0') < tonumber(ARGV[6] or '0') then
  increment = 0
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', increment)
redis.call('HSET', KEYS[1], 'status', 'running', 'entry', ARGV[1], 'owner', ARGV[2], 'worker', ARGV[3],
  'started_ms', ARGV[4], 'claimed_ms', now)
redis.call('EXPIRE', KEYS[1], ARGV[5])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local cancelled = redis.call('EXISTS', KEYS[2])
local started = 0
-- the same refusals as the worker's (job_run.py): cancelled, too many attempts, past its deadline and not resumed
if ARGV[10] and cancelled == 0 and attempts <= tonumber(ARGV[8]) and not (late > 0 and seq == 0) then
  record(KEYS[1], KEYS[3], tostring(seq + 1), seq == 0 and ARGV[9] or ARGV[10], ARGV[11])
  if seq == 0 then redis.call('EXPIRE', KEYS[3], ARGV[5]) end
  started = 1
end
return {'run', tostring(attempts), seq, cancelled, started, late}
