# frozen_string_literal: true

# Enqueue demo jobs and print one job id per line on standard output.
#
#   REDIS_URL=redis://... ruby enqueue.rb --fast 900 --slow 100 --slow-seconds 5 --queues default,low
#
# Fast jobs are spread round-robin over the queues named with --queues; slow jobs go to the "slow" queue unless
# --slow-queue says otherwise. --failing enqueues jobs that always raise. --in N schedules the jobs N seconds ahead.
require "optparse"
require_relative "app"

options = { fast: 0, slow: 0, failing: 0, slow_seconds: 5.0, queues: ["default"], slow_queue: "slow", in: 0 }
OptionParser.new do |parser|
  parser.banner = "Usage: ruby enqueue.rb [options]"
  parser.on("--fast N", Integer, "number of fast jobs") { |value| options[:fast] = value }
  parser.on("--slow N", Integer, "number of slow jobs") { |value| options[:slow] = value }
  parser.on("--failing N", Integer, "number of jobs that always fail") { |value| options[:failing] = value }
  parser.on("--slow-seconds S", Float, "run time of each slow job, in seconds") { |v| options[:slow_seconds] = v }
  parser.on("--queues A,B", Array, "queues for fast jobs, round-robin") { |value| options[:queues] = value }
  parser.on("--slow-queue NAME", "queue for slow jobs") { |value| options[:slow_queue] = value }
  parser.on("--in S", Float, "schedule the jobs S seconds from now") { |value| options[:in] = value }
end.parse!

abort "enqueue.rb: --queues must name at least one queue" if options[:queues].empty?
%i[fast slow failing].each do |kind|
  abort "enqueue.rb: --#{kind} must be 0 or more, got #{options[kind]}" if options[kind].negative?
end

def push(klass, queue, args, delay)
  item = { "class" => klass, "queue" => queue, "args" => args }
  item["at"] = Time.now.to_f + delay if delay.positive?
  Sidekiq::Client.push(item)
end

jids = []
options[:fast].times do |index|
  jids << push(FastJob, options[:queues][index % options[:queues].size], [index], options[:in])
end
options[:slow].times { jids << push(SlowJob, options[:slow_queue], [options[:slow_seconds]], options[:in]) }
options[:failing].times { jids << push(FailingJob, options[:queues].first, [], options[:in]) }
puts jids
